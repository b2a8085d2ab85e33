"""Packed weights: the formats the pack reads (formats.py, gguf_blocks.py) and the layers that keep them packed
(layers.py)."""
