"""Training machinery shared by pre-training and DP fine-tuning."""
