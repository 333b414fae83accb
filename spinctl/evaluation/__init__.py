"""Evaluation: generation and judges, perplexity, preference accuracy, held-out rows, the p/q sweep."""
