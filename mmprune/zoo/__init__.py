"""Models the project builds itself: the shipped trained LLaVA (``shapes_llava/``) and tiny random test models.

``SHIPPED_MODEL`` is a folder in the stock HF layout (config, safetensors, tokenizer, processor), so
``LlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL)`` and ``AutoProcessor.from_pretrained(SHIPPED_MODEL)``
load it offline like any checkpoint; ``python -m mmprune.zoo.train`` reproduces it.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = Path(__file__).parent / "shapes_llava"


def load_shipped(path: str | Path = SHIPPED_MODEL):
    """(model, processor) of the shipped model (or another folder in its layout), fp32, eval mode."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}: expected a folder with config.json and model.safetensors "
                                "(train one with `python -m mmprune.zoo.train --out DIR`)")
    hf_logging.disable_progress_bar()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)
