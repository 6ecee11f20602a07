"""Measurement: accuracy of a (pruned) VLM on QA samples; later FLOPs, latency, memory and the bench sweep."""
