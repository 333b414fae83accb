"""Checkpoint files: safetensors headers and shards, score/selection formats, sidecars, byte-range edits, atomic files, locks."""
