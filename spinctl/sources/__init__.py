"""Where models come from: Hugging Face Hub ids, GGUF conversion, the cached SmolLM2 fetch."""
