"""Sparse attention methods."""
