"""Batch rendering and ComfyUI export."""
