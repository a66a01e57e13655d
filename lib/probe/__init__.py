"""Interpretability on frozen models: probes, activation patching, INLP, attributions, facts."""
