"""Adaptation without training (N01 in-context learning, N02 retrieval-augmented generation):
example selection, chunking, indexes, retrieval and prompt assembly. Sits above training and
below eval: eval, generate and compare apply these techniques to prompts."""
