"""Offline policy tools: regression examples, calibration, rescoring reports. Never imported by
the live service."""
