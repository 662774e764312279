"""The one training loop and its parts (checkpoints, guards, optimizer, data stream)."""
