"""Evaluation: loss and perplexity now; task metrics and the forgetting probe build on it."""
