"""Per-task batch spec, loss and metrics (ner, classification; mlm and clm for pretraining)."""
