"""Running a model: logits, token losses, batched generation, loss over a dataset, reward scores.
Used by the methods, objectives, the loop and evaluation; imports none of them."""
