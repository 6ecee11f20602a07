"""``mmprune bench --speed --geometry G``: prefill and end-to-end speedup at real model sizes, random weights.

The architecture is built from a config (no download): ``llava-1.5-7b`` (CLIP ViT-L/14-336 + LLaMA-7B, 576 visual
tokens), ``llava-next-7b`` (the same CLIP + a Mistral-7B decoder; a 672x672 image is 5 crops, 2928 tokens with the
newlines), ``qwen2.5-vl-7b`` (its 32-block windowed ViT + Qwen2-7B decoder with M-RoPE; an 896x896 image, 1024
tokens), ``qwen2.5-vl-7b-video`` (the same on a mostly static 32-frame 448 px video, 4096 tokens), ``small-video``
(a 0.5B-class Qwen2.5-VL-style model on a 16-frame video, 512 tokens; CPU), and ``small`` (CLIP ViT-B/16-384, 576
visual tokens + a 0.45B LLaMA-style decoder shaped like Qwen2-0.5B: d 896, 24 layers, 14 heads, 2 KV heads, FFN
4864) — the one to use on a CPU. bf16 on a GPU, fp32 on a CPU. Prompts are the image's tokens plus ``text`` text
tokens; every method and budget is timed against the unpruned model (interleaved, median) next to the speedup the
FLOPs model predicts.
"""

from __future__ import annotations

import importlib.util

import torch
from tqdm.auto import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
)

import mmprune
from mmprune import upstream
from mmprune.bench.flops import Geometry, prefill_flops, tower_counts
from mmprune.bench.sweep import implausible, timed_pair

IMAGE_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 32000, 32001, 32002, 32003
AUDIO_TOKEN, AUDIO_START, AUDIO_END = 32004, 32005, 32006
CLIP_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
          "image_size": 336, "patch_size": 14, "projection_dim": 768}
# Qwen2.5-VL-7B's windowed ViT and Qwen2-7B decoder with M-RoPE (also the Qwen2.5-Omni-7B thinker's)
QWEN_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584, "window_size": 112,
                  "fullatt_block_indexes": [7, 15, 23, 31], "in_channels": 3}
QWEN_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
# the CPU-sized Qwen-style tower and 0.5B-class decoder (d 896, 24 layers, 14 heads, 2 KV heads, FFN 4864)
SMALL_QWEN_VISION = {"depth": 12, "hidden_size": 640, "intermediate_size": 1728, "num_heads": 10, "patch_size": 14,
                     "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 896, "window_size": 112,
                     "fullatt_block_indexes": [3, 7, 11], "in_channels": 3}
SMALL_TEXT = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 32064}
SMALL_MROPE_TEXT = dict(SMALL_TEXT, max_position_embeddings=8192,
                        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})  # head_dim 64: sections sum to 32
# Qwen2.5-Omni-7B's audio tower (Whisper-style: 128 mel bins, 100-frame windows)
QWEN_OMNI_7B_AUDIO = {"num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                      "d_model": 1280, "n_window": 100, "output_dim": 3584, "max_source_positions": 1500}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
GEOMETRIES = {
    "llava-1.5-7b": {
        "family": "llava", "vision": CLIP_L,
        "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                 "max_position_embeddings": 4096}},
    "llava-next-7b": {
        "family": "llava_next", "vision": CLIP_L, "image": 672,
        "text": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064,
                 "max_position_embeddings": 8192}},
    "qwen2.5-vl-7b": {"family": "qwen2_5_vl", "image": 896, "vision": QWEN_7B_VISION, "text": QWEN_7B_TEXT},
    # Qwen2.5-VL-7B on a video: 32 frames of 448 px = 16 temporal grids of 32 x 32 patches, 16 x 16 merged tokens
    # each (4096 video tokens); a quarter of each grid's patches move (see mostly_static)
    "qwen2.5-vl-7b-video": {
        "family": "qwen2_5_vl", "video": {"frames": 32, "size": 448, "motion": 0.25},
        "vision": dict(QWEN_7B_VISION, tokens_per_second=2), "text": QWEN_7B_TEXT},
    # a Qwen2.5-VL-style model on a video: 16 frames of 224 px = 8 temporal grids of 16 x 16 patches, 8 x 8 merged
    # tokens each (512 video tokens); a 0.5B-class decoder as in "small"; the CPU geometry for video methods
    "small-video": {
        "family": "qwen2_5_vl", "video": {"frames": 16, "size": 224, "motion": 0.25},
        "vision": dict(SMALL_QWEN_VISION, tokens_per_second=2), "text": SMALL_MROPE_TEXT},
    # the Qwen2.5-Omni-7B thinker on 30 s of audio with its video at 2 fps, interleaved in 2-s chunks: 30 temporal
    # grids of 448 px (16 x 16 merged tokens: 7680 video tokens) and 750 audio tokens
    "qwen2.5-omni-7b": {
        "family": "qwen2_5_omni", "video": {"frames": 60, "size": 448, "motion": 0.25}, "audio": {"seconds": 30},
        "vision": QWEN_7B_VISION, "text": QWEN_7B_TEXT, "audio_tower": QWEN_OMNI_7B_AUDIO},
    # its CPU variant: the same 30 s at 112 px (30 grids of 4 x 4 = 480 video tokens, 750 audio tokens), a 6-layer
    # audio tower of width 512 and the 0.5B-class decoder of "small" (24 layers, so SEATS' stages scale to
    # 14, 15, 17 and the late removal to 20)
    "small-omni": {
        "family": "qwen2_5_omni", "video": {"frames": 60, "size": 112, "motion": 0.25}, "audio": {"seconds": 30},
        "vision": SMALL_QWEN_VISION, "text": SMALL_MROPE_TEXT,
        "audio_tower": dict(QWEN_OMNI_7B_AUDIO, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                            d_model=512, output_dim=896)},
    "small": {
        "family": "llava",
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "image_size": 384, "patch_size": 16, "projection_dim": 512},
        "text": dict(SMALL_TEXT, max_position_embeddings=4096)},
}


def build(spec: dict, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """The random-weight model of a geometry ``spec``, with ``attn_implementation`` (sdpa, eager or
    flash_attention_2, which needs the flash-attn package and a GPU)."""
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r}: expected one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package (pip install "
                         "flash-attn) and a GPU; it is not installed here")
    family = spec["family"]
    common = {"image_token_id": IMAGE_TOKEN}
    if family == "llava":
        config = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=LlamaConfig(**spec["text"]),
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             projector_hidden_act="gelu", **common)
        cls = LlavaForConditionalGeneration
    elif family == "llava_next":
        size = spec["vision"]["image_size"]
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**spec["vision"]),
                                 text_config=MistralConfig(**spec["text"]), vision_feature_layer=-2,
                                 vision_feature_select_strategy="default",
                                 image_grid_pinpoints=[[size, 2 * size], [2 * size, size], [2 * size, 2 * size]],
                                 **common)
        cls = LlavaNextForConditionalGeneration
    elif family == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(vision_config=spec["vision"], text_config=spec["text"], video_token_id=VIDEO_TOKEN,
                                  vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, **common)
        cls = Qwen2_5_VLForConditionalGeneration
    elif family == "qwen2_5_omni":
        text = {k: v for k, v in spec["text"].items() if k != "rope_scaling"}
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": spec["text"].get("rope_theta", 10000.0),
                                   "mrope_section": spec["text"]["rope_scaling"]["mrope_section"]}
        config = Qwen2_5OmniThinkerConfig(
            audio_config=spec["audio_tower"], vision_config=spec["vision"], text_config=text,
            audio_token_index=AUDIO_TOKEN, image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
            audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END, vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END, position_id_per_seconds=25, seconds_per_chunk=2)
        cls = Qwen2_5OmniThinkerForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r} in a speed geometry; expected llava, llava_next, qwen2_5_vl, "
                         "qwen2_5_omni")
    config._attn_implementation = attn_implementation
    with torch.device(device):
        model = cls(config)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def image_inputs(spec: dict, model, batch: int, generator) -> tuple[dict, int, int]:
    """(pixel inputs for ``batch`` images, visual tokens per image, vision-tower tokens per crop)."""
    family, device, dtype = spec["family"], model.device, model.dtype
    if family == "llava":
        size = spec["vision"]["image_size"]
        tokens = (size // spec["vision"]["patch_size"]) ** 2
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(device, dtype)}, tokens, \
            tokens + 1
    if family == "llava_next":
        crop, image = spec["vision"]["image_size"], spec["image"]
        crops = 1 + (image // crop) ** 2
        pixels = {"pixel_values": torch.randn(batch, crops, 3, crop, crop, generator=generator).to(device, dtype),
                  "image_sizes": torch.tensor([[image, image]] * batch, device=device)}
        with torch.no_grad():  # the packed length (unpadding, newlines) as the model computes it
            tokens = model.model.get_image_features(pixel_values=pixels["pixel_values"][:1],
                                                    image_sizes=pixels["image_sizes"][:1]).pooler_output[0].shape[0]
        return pixels, tokens, (crop // spec["vision"]["patch_size"]) ** 2 + 1
    vision = spec["vision"]
    patch_dim = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    if "video" in spec:  # one video per prompt: the tower attends within each temporal grid (a "crop")
        side = spec["video"]["size"] // vision["patch_size"]
        grids = spec["video"]["frames"] // vision["temporal_patch_size"]
        motion = spec["video"].get("motion", 1.0)  # 1.0: every patch of every grid fresh noise
        pixels = {"pixel_values_videos": mostly_static(batch, grids, side * side, patch_dim, motion,
                                                       generator).to(device, dtype),
                  "video_grid_thw": torch.tensor([[grids, side, side]] * batch, device=device),
                  "second_per_grid_ts": torch.tensor([1.0] * batch, device=device)}
        return pixels, grids * side * side // vision["spatial_merge_size"] ** 2, side * side
    side = spec["image"] // vision["patch_size"]
    pixels = {"pixel_values": torch.randn(batch * side * side, patch_dim, generator=generator).to(device, dtype),
              "image_grid_thw": torch.tensor([[1, side, side]] * batch, device=device)}
    return pixels, side * side // vision["spatial_merge_size"] ** 2, side * side


def mostly_static(videos: int, grids: int, patches: int, patch_dim: int, motion: float, generator) -> torch.Tensor:
    """``(videos * grids * patches, patch_dim)`` patch rows of videos whose every temporal grid repeats the first
    except a ``motion`` share of its patches (fresh noise): the redundancy temporal methods remove, so a
    content-driven method (FrameFusion) reduces as it would on a real, mostly static clip."""
    out = []
    for _ in range(videos):
        first = torch.randn(patches, patch_dim, generator=generator)
        for _ in range(grids):
            grid = first.clone()
            moving = torch.randperm(patches, generator=generator)[:int(motion * patches)]
            grid[moving] = torch.randn(moving.numel(), patch_dim, generator=generator)
            out.append(grid)
    return torch.cat(out)


def omni_inputs(spec: dict, model, batch: int, text: int, generator) -> tuple[dict, int, int, int]:
    """A Qwen2.5-Omni prompt with a video and its audio track as the processor lays them out under
    ``use_audio_in_video`` (per 2-s chunk: its grids' tokens, then its 50 audio tokens), at 2 fps (1 s per grid).
    Returns (inputs, video tokens, audio tokens, vision-tower tokens per grid)."""
    pixels, video_tokens, crop_tokens = image_inputs(spec, model, batch, generator)
    pixels["video_second_per_grid"] = pixels.pop("second_per_grid_ts")
    frames = 100 * spec["audio"]["seconds"]  # 100 mel frames per second
    audio_tokens = frames // 4
    grids = spec["video"]["frames"] // spec["vision"]["temporal_patch_size"]
    per_grid = video_tokens // grids
    body = []
    for chunk in range(0, grids, 2):
        body += [VIDEO_TOKEN] * per_grid * len(range(chunk, min(chunk + 2, grids)))
        body += [AUDIO_TOKEN] * min(50, audio_tokens - 25 * chunk)
    media = torch.tensor([VISION_START, AUDIO_START, *body, AUDIO_END, VISION_END]).expand(batch, -1)
    before = torch.randint(10, 30000, (batch, text // 2), generator=generator)
    after = torch.randint(10, 30000, (batch, text - text // 2), generator=generator)
    ids = torch.cat([before, media, after], dim=1).to(model.device)
    mel = model.config.audio_config.num_mel_bins
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels, "use_audio_in_video": True,
              "input_features": torch.randn(batch, mel, frames, generator=generator).to(model.device, model.dtype),
              "feature_attention_mask": torch.ones(batch, frames, dtype=torch.long, device=model.device)}
    return inputs, video_tokens, audio_tokens, crop_tokens


def inputs_for(spec: dict, model, batch: int, text: int, seed: int = 0) -> tuple[dict, int, int]:
    generator = torch.Generator().manual_seed(seed)
    if spec["family"] == "qwen2_5_omni":
        inputs, video, audio, crop_tokens = omni_inputs(spec, model, batch, text, generator)
        return inputs, video + audio, crop_tokens
    pixels, tokens, crop_tokens = image_inputs(spec, model, batch, generator)
    before = torch.randint(10, 30000, (batch, text // 2), generator=generator)
    after = torch.randint(10, 30000, (batch, text - text // 2), generator=generator)
    image = torch.full((batch, tokens), VIDEO_TOKEN if "video" in spec else IMAGE_TOKEN)
    if spec["family"] == "qwen2_5_vl":
        image = torch.cat([torch.full((batch, 1), VISION_START), image, torch.full((batch, 1), VISION_END)], 1)
    ids = torch.cat([before, image, after], dim=1).to(model.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}
    if spec["family"] == "qwen2_5_vl":
        inputs["mm_token_type_ids"] = upstream.mm_token_types(ids, IMAGE_TOKEN, VIDEO_TOKEN)
    return inputs, tokens, crop_tokens


def flops_counter(spec: dict, model, text_tokens: int, visual: int, crop_tokens: int):
    """``count(tokens_per_layer, stats_sample=None)``: :func:`prefill_flops` (``vision``, ``llm``, ``total``) of one
    prompt of the geometry ``spec`` with ``text_tokens`` text and ``visual`` media tokens, the decoder running on
    ``tokens_per_layer`` media tokens per layer; ``stats_sample`` (``pruner.stats["samples"][i]``) supplies a
    shortened encoder (FlowCut)."""
    g = Geometry.from_config(model.config)
    crops = 1 + (spec["image"] // spec["vision"]["image_size"]) ** 2 if spec["family"] == "llava_next" else 1
    if "video" in spec:  # the tower attends within each temporal grid
        crops = spec["video"]["frames"] // spec["vision"]["temporal_patch_size"]
    audio = (100 * spec["audio"]["seconds"],) if "audio" in spec else ()
    projected = visual - (audio[0] // 4 if audio else 0)  # the vision merger maps the video tokens only

    def count(per_layer: list[int], sample: dict | None = None) -> dict[str, int]:
        tower = tower_counts(sample or {})  # FlowCut: the shortened encoder and projector
        return prefill_flops(g, text_tokens, per_layer, crops, tower.get("projected", projected), crop_tokens,
                             audio_frames=audio, encoder_tokens=tower.get("encoder_tokens"))

    return count


def speed_sweep(geometry: str | dict, methods: list[str], keeps: list, batches=(1, 16), text: int = 64,
                reps: int = 3, decode_steps: int = 8, device: str | None = None, progress: bool = True,
                keep_audio: int | float | None = None, attn_implementation: str = "sdpa") -> list[dict]:
    """Rows of measured and FLOPs-predicted speedups; ``keep_audio`` goes to the methods that prune audio."""
    spec = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    name = geometry if isinstance(geometry, str) else "custom"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(spec, device, dtype, attn_implementation)
    g = Geometry.from_config(model.config)
    reference = mmprune.get("none")
    rows = []
    bar = tqdm(total=len(batches) * len(methods) * len(keeps), desc="speed", unit="run", disable=not progress)
    for batch in batches:
        inputs, visual, crop_tokens = inputs_for(spec, model, batch, text)
        counter = flops_counter(spec, model, inputs["input_ids"].shape[1] - visual, visual, crop_tokens)

        def flops(per_layer: list[int], sample: dict | None = None) -> int:
            return counter(per_layer, sample)["total"]

        base = flops([visual] * g.layers)
        for method in methods:
            for keep in keeps:
                bar.set_postfix_str(f"batch {batch} {method} keep={keep}")
                row = {"geometry": name, "batch": batch, "method": method, "keep": keep, "visual_tokens": visual,
                       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "status": "ok"}
                try:
                    extra = ({"keep_audio": keep_audio} if keep_audio is not None
                             and mmprune.METHODS[method].prunes("audio") else {})
                    pruner = mmprune.get(method, keep=keep, **extra)
                    speed = timed_pair(model, inputs, pruner, reference, reps, decode_steps)
                    per_layer = pruner.stats["samples"][0]["tokens_per_layer"]
                    predicted = base / flops(per_layer, pruner.stats["samples"][0])
                    measured = speed["prefill_ref"] / speed["prefill"]
                    row.update(tokens_per_layer_last=per_layer[-1],
                               equivalent_tokens=sum(per_layer) / len(per_layer),
                               prefill_ms=1000 * speed["prefill"], prefill_ms_unpruned=1000 * speed["prefill_ref"],
                               prefill_speedup=measured, flops_speedup=predicted,
                               measured_over_predicted=measured / predicted,
                               e2e_speedup=speed["e2e_ref"] / speed["e2e"],
                               selection_share=speed["selection_ms"] / (1000 * speed["prefill"]),
                               timing_noisy=implausible("prefill", measured, predicted))
                except Exception as exc:  # reported, the sweep goes on  # noqa: BLE001
                    row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                rows.append(row)
                bar.update()
    bar.close()
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
                     f"{r['prefill_speedup']:.2f}x{'*' if r.get('timing_noisy') else ''} | {r['flops_speedup']:.2f}x | "
                     f"{r['measured_over_predicted']:.2f} | "
                     f"{r['e2e_speedup']:.2f}x | {100 * r['selection_share']:.1f} |")
    noisy = [f"* batch {r['batch']} {r['method']} keep={r['keep']}: {r['timing_noisy']} (noise, not a result)"
             for r in rows if r.get("timing_noisy")]
    return "\n".join(lines + ([""] + noisy if noisy else []))
