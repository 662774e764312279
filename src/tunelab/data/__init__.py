"""Data pipeline: source -> validate -> format + template -> tokenize + mask -> pack -> batches."""
