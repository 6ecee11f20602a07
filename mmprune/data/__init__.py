"""Evaluation data: the synthetic visual-QA benchmark (and, for users' own data, a JSONL loader)."""
