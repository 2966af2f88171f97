"""Evaluation metrics: Frechet distances, the FID Inception network, attribute-control
metrics, report tables and plots."""
