"""Differential privacy: accounting, Poisson sampling, per-example clipping, noise,
and the privacy ledger (PRIVACY.md)."""
