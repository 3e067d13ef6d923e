"""Evaluation: perplexity, agreement with the dense base, speed and cost."""
