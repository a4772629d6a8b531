"""Model organisms: base and fine-tuned checkpoints with known ground truth, built offline."""
