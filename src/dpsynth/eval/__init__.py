"""Evaluation of synthetic data: distribution metrics (FID/FD, KID,
precision/recall), downstream classifiers, hyperparameter ranking."""
