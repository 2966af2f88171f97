"""Evaluation metrics: Frechet distances, the FID Inception network, report plots."""
