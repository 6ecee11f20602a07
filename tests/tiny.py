"""Tiny random-weight models of every supported family, built from configs in code (no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    Qwen2Config,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 96
IMAGE_TOKEN = 95
PAD = 0


def _text(hidden: int = 32, layers: int = 4, **kw) -> dict:
    return dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, **kw)


def _clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=16)


def llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=_clip(), text_config=LlamaConfig(**_text()), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def llava_next(seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=_clip(), text_config=LlamaConfig(**_text()), image_token_id=IMAGE_TOKEN,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return LlavaNextForConditionalGeneration(cfg).eval()


def llava_next_video(seed: int = 0) -> LlavaNextVideoForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(vision_config=_clip(), text_config=LlamaConfig(**_text()), image_token_id=IMAGE_TOKEN,
                               video_token_id=VIDEO_TOKEN, vision_feature_layer=-2,
                               vision_feature_select_strategy="default",
                               image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], spatial_pool_mode="average",
                               spatial_pool_stride=2)
    return LlavaNextVideoForConditionalGeneration(cfg).eval()


def llava_onevision(seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """SigLIP 32/8 (4x4 patches per crop, no [CLS]), Qwen2 decoder. ``anyres_max_1`` makes the 64x64 image's 8x8
    high-res grid shrink to 4x4 (and the 32x64 image's 4x8 to 2x5), so the bilinear path of the packing runs."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**_text()), image_token_id=IMAGE_TOKEN,
                               video_token_id=VIDEO_TOKEN, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
                               image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def qwen2_vl(seed: int = 0, v25: bool = False):
    torch.manual_seed(seed)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, in_chans=3)
    text = _text(rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    if v25:
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                               video_token_id=94, vision_start_token_id=93, vision_end_token_id=92)
        return Qwen2_5_VLForConditionalGeneration(cfg).eval()
    cfg = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=94,
                        vision_start_token_id=93, vision_end_token_id=92)
    return Qwen2VLForConditionalGeneration(cfg).eval()


VISION_START, VISION_END = 93, 92
VIDEO_TOKEN = 94
AUDIO_TOKEN, AUDIO_START, AUDIO_END = 91, 90, 89
MEL_BINS = 16


def qwen2_5_omni(seed: int = 0) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """A tiny Qwen2.5-Omni thinker: the Qwen2.5-VL tower of ``qwen2_vl(v25=True)``, a 2-layer audio tower on 16 mel
    bins attending within 100-frame (1 s) windows, 25 audio tokens per second."""
    torch.manual_seed(seed)
    cfg = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=MEL_BINS, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          d_model=32, n_window=50, output_dim=32, max_source_positions=1500),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=32,
                           fullatt_block_indexes=[1]),
        text_config=_text(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        audio_token_index=AUDIO_TOKEN, image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
        audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, position_id_per_seconds=25, seconds_per_chunk=2)
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the placeholder ids get logit 0, below the best of the other 89: never generated, so a
        # prompt extended with generated tokens (the replay tests) keeps its placeholder counts (Omni counts them in
        # input_ids; the Qwen-VL tests carry mm_token_type_ids instead)
        model.lm_head.weight[AUDIO_END:] = 0
    return model


def qwen3_omni(seed: int = 0, deepstack: tuple[int, ...] = (0,)) -> Qwen3OmniMoeThinkerForConditionalGeneration:
    """A tiny Qwen3-Omni thinker: MoE decoder (4 experts, 2 active, per-head q/k norms), a vision tower without
    windows whose block ``deepstack`` outputs feed DeepStack (one layer by default, so every stage layer >= 1 is
    allowed), an audio tower downsampling 8x (13 tokens per 100 mel frames)."""
    torch.manual_seed(seed)
    cfg = Qwen3OmniMoeThinkerConfig(
        audio_config=dict(num_mel_bins=MEL_BINS, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          d_model=32, n_window=50, output_dim=32, max_source_positions=1500,
                          downsample_hidden_size=8, n_window_infer=100, conv_chunksize=500),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           deepstack_visual_indexes=list(deepstack), num_position_embeddings=64),
        text_config=_text(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=8,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                           "mrope_interleaved": True}),
        audio_token_id=AUDIO_TOKEN, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, position_id_per_seconds=13)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # placeholders never generated (see qwen2_5_omni)
        model.lm_head.weight[AUDIO_END:] = 0
    return model


def qwen3_vl(seed: int = 0, deepstack: tuple[int, ...] = (0,)) -> Qwen3VLForConditionalGeneration:
    """A tiny Qwen3-VL: the vision tower of ``qwen3_omni`` (DeepStack after decoder layer 0 by default), a dense
    decoder with per-head q/k norms and interleaved M-RoPE."""
    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           deepstack_visual_indexes=list(deepstack), num_position_embeddings=64),
        text_config=_text(head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END)
    return Qwen3VLForConditionalGeneration(cfg).eval()


def internvl(seed: int = 0) -> InternVLForConditionalGeneration:
    """A tiny InternVL3: InternViT (with [CLS]) on 32-px tiles of 8 x 8 patches, pixel-shuffled to 4 x 4 = 16 tokens
    per tile, and a Qwen2 decoder."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[32, 32], patch_size=[4, 4])
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_text()).to_dict(),
                         image_token_id=IMAGE_TOKEN, image_seq_length=16)
    return InternVLForConditionalGeneration(cfg).eval()


def qwen3_5(seed: int = 0, layers: int = 4):
    """A tiny Qwen3.5: the vision tower of ``qwen3_vl`` without DeepStack, and a hybrid decoder in the released 3:1
    pattern: every fourth layer full (gated) attention, with interleaved M-RoPE over the first quarter of its 32-dim
    heads, the others linear attention (Gated DeltaNet, 2 key and 4 value heads of 8, convolution kernel 4); with the
    default 4 layers, layers 0-2 are linear and layer 3 full."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    kinds = ["full_attention" if (index + 1) % 4 == 0 else "linear_attention" for index in range(layers)]
    cfg = Qwen3_5Config(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=64),
        text_config=_text(layers=layers, head_dim=32, layer_types=kinds,
                          linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                          linear_num_key_heads=2, linear_num_value_heads=4,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                           "mrope_interleaved": True, "partial_rotary_factor": 0.25}),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END)
    return Qwen3_5ForConditionalGeneration(cfg).eval()


def gemma3(seed: int = 0, sliding_window: int = 64) -> Gemma3ForConditionalGeneration:
    """A tiny Gemma 3: SigLIP on 16-px images of 8 x 8 patches, average-pooled 2 x 2 to 4 x 4 = 16 tokens per image,
    and a 4-layer decoder of local (sliding-window) and global layers in Gemma 3's order (local first). The default
    window is longer than the test prompts; a shorter one tests what the window changes."""
    torch.manual_seed(seed)
    text = _text(head_dim=8, sliding_window=sliding_window, query_pre_attn_scalar=8,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=2)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=IMAGE_TOKEN,
                       boi_token_index=VISION_START, eoi_token_index=VISION_END)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the projection matrix starts at zero (every image token alike): give it random weights
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.05)
    return model


# Idefics3 / SmolVLM prompt tokens (text ids of the tiny vocabulary, none of the special ids above): the processor's
# <fake_token_around_image>, <global-img>, <row_i_col_j> for tiles (1, 1) (1, 2) (2, 1) (2, 2), and "\n"
IDEFICS3_FAMILIES = ("idefics3", "smolvlm")
FAKE_AROUND_IMAGE, GLOBAL_IMAGE = 88, 87
TILE_MARKERS = {(1, 1): 83, (1, 2): 84, (2, 1): 85, (2, 2): 86}
NEWLINE = 10
IDEFICS3_TILE_PX = {"idefics3": 32, "smolvlm": 48}


def idefics3(seed: int = 0):
    """A tiny Idefics3: a 2-layer SigLIP on 32-px tiles of 8 x 8 patches of 4 px, pixel-shuffled (scale 2) to
    4 x 4 = 16 tokens per tile, and a Llama decoder."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _idefics3_like(Idefics3Config, Idefics3ForConditionalGeneration, seed,
                          tile_px=IDEFICS3_TILE_PX["idefics3"], scale=2)


def smolvlm(seed: int = 0):
    """A tiny SmolVLM: a 2-layer SigLIP on 48-px tiles of 12 x 12 patches of 4 px, pixel-shuffled (scale 3, 9
    patches per token) to 4 x 4 = 16 tokens per tile, and a Llama decoder."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _idefics3_like(SmolVLMConfig, SmolVLMForConditionalGeneration, seed,
                          tile_px=IDEFICS3_TILE_PX["smolvlm"], scale=3)


def _idefics3_like(config_class, model_class, seed: int, tile_px: int, scale: int):
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=tile_px,
                  patch_size=4)
    cfg = config_class(vision_config=vision, text_config=LlamaConfig(**_text()).to_dict(),
                       image_token_id=IMAGE_TOKEN, scale_factor=scale)
    return _no_markup_generated(model_class(cfg).eval())


def _no_markup_generated(model):
    """The image placeholder and the prompt's image markup ids (83 .. 95) get logit 0, below the best of the other
    ids: never generated, so a prompt extended with generated tokens (the replay tests) keeps its image layout. EOS
    likewise, so every generation runs its max_new_tokens (the tests compare fixed-length continuations)."""
    with torch.no_grad():
        model.lm_head.weight[min(TILE_MARKERS.values()):] = 0
        model.lm_head.weight[model.config.text_config.eos_token_id] = 0
    return model


def idefics3_split(image_id: int) -> tuple[int, int]:
    """(rows, cols) of tiles the processor cuts image ``image_id`` into: even ids fit one tile (0, 0: the global
    image alone); odd ids are 1 x 2 tiles plus the global image."""
    return (0, 0) if image_id % 2 == 0 else (1, 2)


def idefics3_image_ids(image_id: int) -> list[int]:
    """Image ``image_id``'s prompt ids as the Idefics3 / SmolVLM processors expand ``<image>``: each tile behind
    ``<fake_token_around_image><row_i_col_j>``, a newline after each row of tiles, then a newline and the global
    image behind ``<fake_token_around_image><global-img>``, closed by ``<fake_token_around_image>``."""
    rows, cols = idefics3_split(image_id)
    run = [IMAGE_TOKEN] * 16
    ids: list[int] = []
    for row in range(rows):
        for col in range(cols):
            ids += [FAKE_AROUND_IMAGE, TILE_MARKERS[row + 1, col + 1]] + run
        ids += [NEWLINE]
    return ids + ([NEWLINE] if rows else []) + [FAKE_AROUND_IMAGE, GLOBAL_IMAGE] + run + [FAKE_AROUND_IMAGE]


def idefics3_pixels(tiles_by_sample: dict[int, list[torch.Tensor]], samples: int) -> dict:
    """``pixel_values`` ``(B, tiles, 3, H, W)`` and ``pixel_attention_mask`` ``(B, tiles, H, W)`` as the processor
    pads them: each sample's tiles (its images' tiles in prompt order), then all-zero padding tiles (mask 0) up to the
    sample with the most; a sample without images is all padding."""
    per_sample = {sample: torch.cat(tiles, dim=1)[0] for sample, tiles in tiles_by_sample.items()}
    most = max(tiles.shape[0] for tiles in per_sample.values())
    shape = next(iter(per_sample.values())).shape[1:]
    values = torch.zeros(samples, most, *shape)
    mask = torch.zeros(samples, most, *shape[1:], dtype=torch.long)
    for sample, tiles in per_sample.items():
        values[sample, :tiles.shape[0]] = tiles
        mask[sample, :tiles.shape[0]] = 1
    return {"pixel_values": values, "pixel_attention_mask": mask}


def audio_frames(audio_id: int) -> int:
    """Mel frames of audio ``audio_id``: 2 s (200 frames, 50 tokens) for even ids, 1 s (100, 25) for odd ones."""
    return 200 if audio_id % 2 == 0 else 100


def tokens_per_audio(audio_id: int, family: str = "qwen2_5_omni") -> int:
    if family == "qwen3_omni":  # 13 tokens per 100 mel frames
        return 13 * audio_frames(audio_id) // 100
    return audio_frames(audio_id) // 4


def audio_features(audio_id: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3000 + audio_id)
    return torch.randn(MEL_BINS, audio_frames(audio_id), generator=g)


def image_pixels(family: str, image_id: int) -> dict:
    """Deterministic pixels of image ``image_id`` for ``family`` (one image; concatenate for several)."""
    g = torch.Generator().manual_seed(1000 + image_id)
    if family == "llava":
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    if family in ("llava_next", "llava_next_video"):
        # (H, W) = (64, 64): base + 4 crops = 5 crops; 16 base tokens + 8 rows x (8 + newline) = 88 tokens
        return {"pixel_values": torch.randn(1, 5, 3, 32, 32, generator=g), "image_sizes": torch.tensor([[64, 64]])}
    if family == "llava_onevision":
        # even ids 64x64: base + 4 crops, 8x8 grid shrunk to 4x4 -> 16 + 4 x (4 + 1) = 36 tokens;
        # odd ids 32x64: base + 2 crops, 4x8 grid shrunk to 2x5 -> 16 + 2 x (5 + 1) = 28 tokens
        if image_id % 2 == 0:
            return {"pixel_values": torch.randn(1, 5, 3, 32, 32, generator=g), "image_sizes": torch.tensor([[64, 64]])}
        return {"pixel_values": torch.randn(1, 3, 3, 32, 32, generator=g), "image_sizes": torch.tensor([[32, 64]])}
    if family == "gemma3":  # one 16-px image (a pan-and-scan crop is another image)
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
    if family in IDEFICS3_FAMILIES:  # (1, tiles, 3, px, px): the split tiles, then the global image
        rows, cols = idefics3_split(image_id)
        px = IDEFICS3_TILE_PX[family]
        return {"pixel_values": torch.randn(1, rows * cols + 1, 3, px, px, generator=g)}
    if family == "internvl":  # even ids: one tile; odd ids: two tiles and the thumbnail
        return {"pixel_values": torch.randn(1 if image_id % 2 == 0 else 3, 3, 32, 32, generator=g)}
    # Qwen: 8x8 patches of 4 px -> 4x4 = 16 merged tokens; alternate a 8x12 image to vary the count
    h, w = (8, 8) if image_id % 2 == 0 else (8, 12)
    return {"pixel_values": torch.randn(h * w, 3 * 2 * 4 * 4, generator=g), "image_grid_thw": torch.tensor([[1, h, w]])}


def video_pixels(family: str, video_id: int) -> dict:
    """Deterministic pixels of video ``video_id``. Qwen families: 2 temporal grids of 8x8 (even ids) or 8x12
    patches of 4 px (2 frames each), so 2 x 4 x 4 = 32 or 2 x 4 x 6 = 48 merged tokens. LLaVA-NeXT-Video: 8 frames
    of 32 px (its batches stack videos, so every video has the same frame count), each 4x4 patches pooled to 2x2:
    32 tokens. LLaVA-OneVision: the same frames, pooled to 2x2 after the projector, and one newline: 33 tokens."""
    g = torch.Generator().manual_seed(2000 + video_id)
    if family in ("llava_next_video", "llava_onevision"):
        return {"pixel_values_videos": torch.randn(1, 8, 3, 32, 32, generator=g)}
    h, w = (8, 8) if video_id % 2 == 0 else (8, 12)
    out = {"pixel_values_videos": torch.randn(2 * h * w, 3 * 2 * 4 * 4, generator=g),
           "video_grid_thw": torch.tensor([[2, h, w]])}
    if family in ("qwen2_5_vl", "qwen2_5_omni", "qwen3_omni"):
        out["second_per_grid_ts"] = torch.tensor([1.0])
    return out


def tokens_per_video(family: str, video_id: int) -> int:
    if family == "llava_onevision":
        return 33
    return 32 if video_id % 2 == 0 or family == "llava_next_video" else 48


def tokens_per_image(family: str, image_id: int) -> int:
    if family == "llava":
        return 16
    if family in ("llava_next", "llava_next_video"):
        return 88
    if family == "llava_onevision":
        return 36 if image_id % 2 == 0 else 28
    if family == "internvl":
        return 16 if image_id % 2 == 0 else 48
    if family in IDEFICS3_FAMILIES:
        rows, cols = idefics3_split(image_id)
        return 16 * (rows * cols + 1)
    if family == "gemma3":
        return 16
    return 16 if image_id % 2 == 0 else 24


def batch(family: str, samples: list[list], side: str = "left") -> dict:
    """Model inputs for samples described as lists of text lengths (int), explicit text ids (``("txt", [ids])``),
    image ids (``("img", id)``) and, on the Qwen families, video ids (``("vid", id)``)."""
    qwen = family.startswith("qwen")
    rows, pixels, videos, audios = [], [], [], []
    tiles_by_sample: dict[int, list] = {}  # Idefics3 / SmolVLM: pixels per sample
    for sample in samples:
        ids: list[int] = []
        for part in sample:
            if isinstance(part, tuple) and part[0] == "aud":
                ids += [AUDIO_START] + [AUDIO_TOKEN] * tokens_per_audio(part[1], family) + [AUDIO_END]
                audios.append(audio_features(part[1]))
            elif isinstance(part, tuple) and part[0] == "txt":  # explicit text token ids
                ids += list(part[1])
            elif isinstance(part, tuple) and part[0] == "vid" and family in ("qwen3_vl", "qwen3_5"):
                # Qwen3-VL's layout: each temporal grid after a timestamp (a text token), in its own vision span
                per_grid = tokens_per_video(family, part[1]) // 2
                for grid in range(2):
                    ids += [60 + grid, VISION_START] + [VIDEO_TOKEN] * per_grid + [VISION_END]
                videos.append(video_pixels(family, part[1]))
            elif isinstance(part, tuple) and part[0] == "vid":
                run = [VIDEO_TOKEN] * tokens_per_video(family, part[1])
                ids += [VISION_START] + run + [VISION_END] if qwen else run
                videos.append(video_pixels(family, part[1]))
            elif isinstance(part, tuple) and family in IDEFICS3_FAMILIES:
                ids += idefics3_image_ids(part[1])
                tiles_by_sample.setdefault(len(rows), []).append(image_pixels(family, part[1])["pixel_values"])
            elif isinstance(part, tuple):
                image_id = part[1]
                run = [IMAGE_TOKEN] * tokens_per_image(family, image_id)
                ids += ([VISION_START] + run + [VISION_END]) if qwen or family == "gemma3" else run
                pixels.append(image_pixels(family, image_id))
            else:
                ids += [3 + (7 * len(ids) + 5 * j) % 80 for j in range(part)]
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    for parts in (pixels, videos):
        for key in (parts[0] if parts else ()):
            out[key] = torch.cat(_pad_crops([p[key] for p in parts]))
    if tiles_by_sample:
        out.update(idefics3_pixels(tiles_by_sample, len(rows)))
    if audios:  # (clips, mel bins, frames) padded to the longest, as WhisperFeatureExtractor with a mask
        longest = max(a.shape[1] for a in audios)
        out["input_features"] = torch.stack([F.pad(a, (0, longest - a.shape[1])) for a in audios])
        out["feature_attention_mask"] = torch.stack(
            [(torch.arange(longest) < a.shape[1]).long() for a in audios])
    if family in ("qwen2_5_omni", "qwen3_omni"):
        if "second_per_grid_ts" in out:
            out["video_second_per_grid"] = out.pop("second_per_grid_ts")
    elif qwen:
        out["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int() + 2 * (input_ids == VIDEO_TOKEN).int()
    elif family == "gemma3":  # as Gemma3Processor: 1 at image tokens (the model's bidirectional blocks)
        out["token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    return out


def _pad_crops(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Images with different crop counts stacked as the processors do: (1, crops, 3, H, W) zero-padded to the most
    crops (the model reads only each image's own)."""
    if tensors[0].dim() != 5:
        return tensors
    most = max(t.shape[1] for t in tensors)
    return [torch.cat([t, t.new_zeros(1, most - t.shape[1], *t.shape[2:])], dim=1) for t in tensors]


BUILDERS = {
    "llava": llava,
    "llava_next": llava_next,
    "llava_next_video": llava_next_video,
    "llava_onevision": llava_onevision,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": lambda seed=0: qwen2_vl(seed, v25=True),
    "qwen2_5_omni": qwen2_5_omni,
    "qwen3_omni": qwen3_omni,
    "qwen3_vl": qwen3_vl,
    "internvl": internvl,
    "gemma3": gemma3,
    "qwen3_5": qwen3_5,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
}
