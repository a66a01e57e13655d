"""Serving a trained model: dynamic batcher, per-head engine, HTTP app (FastAPI), metrics."""
