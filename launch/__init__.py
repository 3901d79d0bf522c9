"""Launchers: Cloud TPU VM pods, GKE via xpk, multi-host GPU, and the sweep expander (README.md)."""
