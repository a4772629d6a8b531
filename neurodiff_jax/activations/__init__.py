"""Activation harvesting: the same tokens run through a base and a fine-tuned model, stored for training."""
