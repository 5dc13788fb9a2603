"""Audits of a trained model: membership leakage, calibration, per-class behaviour; the report."""
