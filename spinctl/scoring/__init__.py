"""Scoring: calibration data, targets, importance methods, the in-memory and layerwise engines, torchrun."""
