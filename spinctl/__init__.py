"""spinctl: SPIN checkpoint surgery (score, select, patch, verify, revert)."""

__version__ = "0.1.0"
