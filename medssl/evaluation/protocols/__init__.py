"""Evaluation protocols: linear probe, fine-tuning and weighted kNN."""
