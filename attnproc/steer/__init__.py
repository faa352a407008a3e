"""Attention-steering edits."""
