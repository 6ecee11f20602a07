"""A tiny random-weight LLaVA with a real processor, saved to disk, for tests that need a model folder fast. Its
answers are meaningless; it exercises the full HF path (processor -> generate) offline."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlavaForConditionalGeneration

from mmprune.zoo.builder import llava_config, llava_processor

WORDS = ["what", "is", "the", "colour", "color", "shape", "of", "object", "in", "image", "how", "many", "are",
         "there", "red", "green", "blue", "circle", "square", "triangle", "yes", "no", "left", "right", "top",
         "bottom", "a", "an", "describe", "this", "?", ".", "USER", "ASSISTANT", ":"]


def build_tiny_llava(path: str | Path, seed: int = 0, image_size: int = 96, patch_size: int = 8) -> Path:
    path = Path(path)
    processor = llava_processor(WORDS, image_size, patch_size)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)
    config = llava_config(processor.tokenizer, vision, hidden_size=64, intermediate_size=128, num_layers=4,
                          num_heads=4, num_kv_heads=2)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
