"""``mmprune bench --speed --geometry G``: prefill and end-to-end speedup at real model sizes, random weights.

The architecture is built from a config (no download): ``llava-1.5-7b`` (CLIP ViT-L/14-336 + a LLaMA-7B decoder,
576 visual tokens) and ``small`` (CLIP ViT-B/16-384, 576 visual tokens + a 0.45B LLaMA-style decoder shaped like
Qwen2-0.5B: d 896, 24 layers, 14 heads, 2 KV heads, FFN 4864) — the one to use on a CPU. bf16 on a GPU, fp32 on
a CPU. Prompts are 576 image tokens plus ``text`` text tokens; each method and budget is timed against the
unpruned model (interleaved, median) next to the speedup the FLOPs model predicts.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import mmprune
from mmprune.bench.flops import Geometry, prefill_flops
from mmprune.bench.sweep import timed_pair

IMAGE_TOKEN = 32000
GEOMETRIES = {
    "llava-1.5-7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)),
    "small": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=384, patch_size=16, projection_dim=512),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096)),
}


def build(geometry: str | dict, device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    spec = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    config = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=LlamaConfig(**spec["text"]),
                         image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def inputs_for(model, batch: int, text: int, seed: int = 0) -> dict:
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(10, 30000, (batch, text // 2), generator=generator)
    after = torch.randint(10, 30000, (batch, text - text // 2), generator=generator)
    ids = torch.cat([before, torch.full((batch, tokens), IMAGE_TOKEN), after], dim=1)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": ids.to(model.device), "attention_mask": torch.ones_like(ids).to(model.device),
            "pixel_values": pixels.to(model.device, model.dtype)}


def speed_sweep(geometry: str | dict, methods: list[str], keeps: list, batches=(1, 16), text: int = 64,
                reps: int = 3, decode_steps: int = 8, device: str | None = None) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(geometry, device, dtype)
    g = Geometry.from_config(model.config)
    reference = mmprune.get("none")
    rows = []
    for batch in batches:
        inputs = inputs_for(model, batch, text)
        visual = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        base = prefill_flops(g, text, [visual] * g.layers, 1, visual)["total"]
        for method in methods:
            for keep in keeps:
                row = {"geometry": geometry if isinstance(geometry, str) else "custom", "batch": batch,
                       "method": method, "keep": keep, "device": torch.cuda.get_device_name() if
                       device.type == "cuda" else "cpu", "status": "ok"}
                try:
                    pruner = mmprune.get(method, keep=keep)
                    speed = timed_pair(model, inputs, pruner, reference, reps, decode_steps)
                    with torch.no_grad(), pruner.attach(model):
                        model(**inputs_for(model, 1, text))
                    per_layer = pruner.stats["samples"][0]["tokens_per_layer"]
                    predicted = base / prefill_flops(g, text, per_layer, 1, visual)["total"]
                    measured = speed["prefill_ref"] / speed["prefill"]
                    row.update(tokens_per_layer_last=per_layer[-1],
                               equivalent_tokens=sum(per_layer) / len(per_layer),
                               prefill_ms=1000 * speed["prefill"], prefill_ms_unpruned=1000 * speed["prefill_ref"],
                               prefill_speedup=measured, flops_speedup=predicted,
                               measured_over_predicted=measured / predicted,
                               e2e_speedup=speed["e2e_ref"] / speed["e2e"],
                               selection_share=speed["selection_ms"] / (1000 * speed["prefill"]))
                except Exception as exc:  # reported, the sweep goes on
                    row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                rows.append(row)
    return rows


def speed_markdown(rows: list[dict]) -> str:
    lines = ["| geometry | device | batch | method | keep | T_eq | prefill ms (unpruned) | prefill speedup | "
             "FLOPs speedup | measured / predicted | e2e speedup | selection % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['geometry']} | {r['device']} | {r['batch']} | {r['method']} | {r['keep']} | "
                         f"{r['status']} | | | | | | |")
            continue
        lines.append(f"| {r['geometry']} | {r['device']} | {r['batch']} | {r['method']} | {r['keep']} | "
                     f"{r['equivalent_tokens']:.0f} | {r['prefill_ms']:.0f} ({r['prefill_ms_unpruned']:.0f}) | "
                     f"{r['prefill_speedup']:.2f}x | {r['flops_speedup']:.2f}x | {r['measured_over_predicted']:.2f} | "
                     f"{r['e2e_speedup']:.2f}x | {100 * r['selection_share']:.1f} |")
    return "\n".join(lines)
