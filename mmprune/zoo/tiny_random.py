"""A tiny random-weight LLaVA with a real processor, saved to disk, for tests that need a model folder fast. Its
answers are meaningless; it exercises the full HF path (processor -> generate) offline."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlavaForConditionalGeneration, Qwen2VLConfig, Qwen2VLImageProcessorPil
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
from transformers import Qwen2VLForConditionalGeneration, SiglipImageProcessorPil, SiglipVisionConfig

from mmprune.zoo.builder import llava_config, llava_processor, word_tokenizer

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


QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_qwen2_vl(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen2-VL folder: config and weights, a word-level tokenizer with Qwen's vision tokens and a chat
    template, and the PIL image processor (no processor file: Qwen's processor needs torchvision)."""
    path = Path(path)
    tokenizer = word_tokenizer(WORDS + QWEN_SPECIAL)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})  # matched whole, never split
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(vocab), max_position_embeddings=1024, pad_token_id=vocab["<pad>"],
                bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, in_chans=3)
    config = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=vocab["<|image_pad|>"],
                           video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                           vision_end_token_id=vocab["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64,
                             max_pixels=64 * 64).save_pretrained(path)
    return path


def build_tiny_llava_onevision(path: str | Path, seed: int = 0) -> Path:
    """A tiny random LLaVA-OneVision folder: SigLIP 32/8 tower, Qwen2 decoder, a word-level tokenizer with ``<image>``
    and ``<video>``, and a PIL image processor (no processor file: its processor needs torchvision)."""
    path = Path(path)
    tokenizer = word_tokenizer(WORDS + ["<video>"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=1024,
                       pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                                  video_token_id=vocab["<video>"], vision_feature_layer=-1,
                                  vision_feature_select_strategy="full",
                                  image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
