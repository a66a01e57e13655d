"""Workbench library: models, Hugging Face interop, data, training, PEFT, metrics."""
