"""The FLOPs model against values computed by hand for the tiny LLaVA config (tests/tiny.py)."""

from __future__ import annotations

import pytest
from conftest import tiny_model

import tiny

from mmprune.bench.flops import Geometry, decode_flops, llm_prefill_flops, prefill_flops

# tiny LLaVA: LLM d=32, m=64 (SwiGLU), 4 layers, 4 heads, 2 KV heads of 8 (d_kv = 16), vocab 96;
# CLIP d=32, m=64, 3 layers, 32 px / patch 8 -> 16 patches + [CLS] = 17 tokens, patch dim 3*8*8 = 192;
# projector 32->32->32.


def llm_layer(n):  # by hand: Q,O 2*n*32*32 each; K,V 2*n*32*16 each; QK^T and AV 2*n*n*32 each; FFN 3 x 2*n*32*64
    return 2 * n * 32 * 32 * 2 + 2 * n * 32 * 16 * 2 + 2 * n * n * 32 * 2 + 2 * n * 32 * 64 * 3


LM_HEAD = 2 * 32 * 96


def test_geometry_from_the_tiny_llava_config():
    g = Geometry.from_config(tiny_model("llava").config)
    assert (g.hidden, g.intermediate, g.layers, g.heads, g.kv_heads, g.head_dim, g.vocab) == (32, 64, 4, 4, 2, 8, 96)
    assert (g.vision_hidden, g.vision_intermediate, g.vision_layers, g.vision_tokens, g.patch_dim) == (
        32, 64, 3, 17, 192)


def test_pre_llm_prefill_by_hand():
    g = Geometry.from_config(tiny_model("llava").config)
    # 7 text tokens; unpruned 16 visual tokens in every layer, pre-LLM pruning to 4
    assert llm_prefill_flops(g, 7, [16] * 4) == 4 * llm_layer(23) + LM_HEAD == 4 * 491648 + 6144
    assert llm_prefill_flops(g, 7, [4] * 4) == 4 * llm_layer(11) + LM_HEAD
    clip_layer = 2 * 17 * 32 * 32 * 4 + 2 * 17 * 17 * 32 * 2 + 2 * 17 * 32 * 64 * 2
    vision = 2 * 16 * 192 * 32 + 3 * clip_layer
    projector = 2 * 16 * 32 * 32 * 2
    out = prefill_flops(g, 7, [4] * 4, crops=1, visual_before=16)
    assert out == {"vision": vision + projector, "llm": 4 * llm_layer(11) + LM_HEAD,
                   "total": vision + projector + 4 * llm_layer(11) + LM_HEAD}


def test_multi_stage_prefill_and_decode_by_hand():
    g = Geometry.from_config(tiny_model("llava").config)
    # 16 visual tokens before layer 1, 8 in layer 1, 4 in layers 2-3 (a PyramidDrop-like schedule)
    assert llm_prefill_flops(g, 7, [16, 8, 4, 4]) == llm_layer(23) + llm_layer(15) + 2 * llm_layer(11) + LM_HEAD
    # one decode step: 1 query token against cache + itself in each layer
    one = 2 * 32 * 32 * 2 + 2 * 32 * 16 * 2 + 2 * 24 * 32 * 2 + 2 * 32 * 64 * 3  # context 23 + 1
    short = 2 * 32 * 32 * 2 + 2 * 32 * 16 * 2 + 2 * 12 * 32 * 2 + 2 * 32 * 64 * 3  # context 11 + 1
    middle = one - 2 * 24 * 32 * 2 + 2 * 16 * 32 * 2  # context 15 + 1
    assert decode_flops(g, [23, 15, 11, 11], steps=1) == one + middle + 2 * short + LM_HEAD


def test_bad_layer_counts():
    g = Geometry.from_config(tiny_model("llava").config)
    with pytest.raises(ValueError, match="3 entries for 4 layers"):
        llm_prefill_flops(g, 7, [16, 16, 16])


def test_a_video_tower_is_counted_per_temporal_grid_by_hand():
    """Tiny Qwen2.5-VL (tests/tiny.py): vision width 32, gated MLP 64, 2 blocks, patch 4 x 4 x 2 frames (patch dim
    3*2*4*4 = 96), merge 2x2 -> projector 128->128->32. Video 0: 2 temporal grids of 8 x 8 patches; the tower
    attends within each grid (64 tokens), the projector maps the 2 x 16 = 32 merged tokens."""
    g = Geometry.from_config(tiny_model("qwen2_5_vl").config)
    assert (g.vision_hidden, g.vision_intermediate, g.vision_layers, g.vision_ffn_matrices, g.patch_dim) == (
        32, 64, 2, 3, 96)

    def block(n):  # Q, K, V, O 2*n*32*32 each; QK^T and AV 2*n*n*32 each; gated MLP 3 x 2*n*32*64
        return 2 * n * 32 * 32 * 4 + 2 * n * n * 32 * 2 + 2 * n * 32 * 64 * 3

    per_grid = 2 * 64 * 96 * 32 + 2 * block(64)
    projector = 2 * 32 * 128 * 128 + 2 * 32 * 128 * 32
    out = prefill_flops(g, 9, [32] * 4, crops=2, visual_before=32, tokens_per_crop=64)
    assert out["vision"] == 2 * per_grid + projector == 2 * (393216 + 2 * 1835008) + 1310720


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_a_llava_video_is_counted_per_frame_with_its_pooling_by_hand(family):
    """8 frames of 32 px, 4x4 patches of 8 px (patch dim 3*8*8 = 192), vision width 32, plain MLP 64. LLaVA-NeXT-Video
    (CLIP, 3 layers, [CLS]): 17 tokens per frame; pooled to 2x2 before the projector (32->32->32), which maps
    8 x 4 = 32 tokens. LLaVA-OneVision (SigLIP, 2 layers, no [CLS]): 16 tokens per frame; the projector maps all
    8 x 16 = 128 patches, then each frame is pooled to 2x2 and a newline closes the video (33 LLM tokens)."""
    g = Geometry.from_config(tiny_model(family).config)
    cls, layers, projected = (1, 3, 32) if family == "llava_next_video" else (0, 2, 128)
    assert (g.vision_tokens, g.vision_cls, g.vision_layers, g.patch_dim) == (16 + cls, cls, layers, 192)

    def layer(n):  # Q, K, V, O 2*n*32*32 each; QK^T and AV 2*n*n*32 each; MLP 2 x 2*n*32*64
        return 2 * n * 32 * 32 * 4 + 2 * n * n * 32 * 2 + 2 * n * 32 * 64 * 2

    per_frame = 2 * 16 * 192 * 32 + layers * layer(16 + cls)
    projector = 2 * projected * 32 * 32 * 2
    visual = tiny.tokens_per_video(family, 0)
    out = prefill_flops(g, 5, [visual] * 4, crops=8, visual_before=visual,
                        projected=projected if family == "llava_onevision" else None)
    assert out["vision"] == 8 * per_frame + projector


def test_the_omni_audio_tower_is_counted_per_chunk_by_hand():
    """Tiny Qwen2.5-Omni thinker (tests/tiny.py): 16 mel bins, width 32, MLP 64, 2 layers, chunks of 100 mel frames
    (50 tokens after the stride-2 conv), projection 32 -> 32. A 250-frame clip: conv1 on 250 frames, conv2 on
    125, chunks of 50, 50 and 25 tokens, 62 tokens out of the 2x pooling."""
    from conftest import omni_supported

    if not omni_supported():
        pytest.skip("the Omni thinker is supported from transformers 5.21")
    from mmprune.bench.flops import audio_flops

    g = Geometry.from_config(tiny_model("qwen2_5_omni").config)
    assert (g.audio_mel_bins, g.audio_hidden, g.audio_intermediate, g.audio_layers, g.audio_window, g.audio_out) == (
        16, 32, 64, 2, 100, 32)

    def layer(n):  # Q, K, V, O 2*n*32*32 each; QK^T and AV 2*n*n*32 each; MLP 2 x 2*n*32*64
        return 2 * n * 32 * 32 * 4 + 2 * n * n * 32 * 2 + 2 * n * 32 * 64 * 2

    convs = 2 * 250 * 3 * 16 * 32 + 2 * 125 * 3 * 32 * 32
    expected = convs + 2 * (layer(50) * 2 + layer(25)) + 2 * 62 * 32 * 32
    assert audio_flops(g, 250) == expected
    base = prefill_flops(g, 5, [10] * 4, crops=0, visual_before=0, tokens_per_crop=0)
    with_audio = prefill_flops(g, 5, [10] * 4, crops=0, visual_before=0, tokens_per_crop=0, audio_frames=(250, 100))
    assert with_audio["vision"] - base["vision"] == expected + audio_flops(g, 100)


def test_models_the_flops_model_does_not_cover_are_refused():
    from conftest import omni_supported

    if not omni_supported():
        pytest.skip("the Omni thinkers are supported from transformers 5.21")
    with pytest.raises(ValueError, match=r"does not cover Qwen3OmniMoeThinkerConfig yet"):
        Geometry.from_config(tiny_model("qwen3_omni").config)
