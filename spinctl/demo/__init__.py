"""The demos: `spinctl demo` on SmolLM2 and `spinctl demo --tiny` on a random tiny model."""
