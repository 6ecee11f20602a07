"""Doors into mmprune from other tools: ``lmms_eval`` (a model for the lmms-eval harness, found through its
``lmms_eval.models`` entry point). Nothing here is imported by ``import mmprune``: each module imports its tool."""
