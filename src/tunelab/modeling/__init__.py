"""Models and tokenizers: loading a base (local folder, hub id or the embedded tunelab-tiny) safely,
the classification / reward head model type, and the BPE trainer of the embedded base."""
