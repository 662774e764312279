"""Evaluation: task kinds (tasks.py), the forgetting probe, classification heads, and one entry
point for all of them (suite.py). Inference itself (generation, losses, rewards) is in inference/."""
