"""FlashVLM: kept indices against the rule written with numpy (relevance, sharpening, top-p damping, log-domain
fusion, VisPruner's partition), which text it reads, the per-family norm gate, newline tokens and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import duplicate_rounds

import mmprune
from mmprune.media import MediaItem, Segment
from mmprune.prompt import PromptText


def prompt(text: torch.Tensor, instruction: list[bool] | None = None) -> PromptText:
    count = text.shape[0]
    mask = torch.ones(count, dtype=torch.bool) if instruction is None else torch.tensor(instruction)
    return PromptText(ids=torch.arange(count), embeds=text, positions=torch.arange(count), instruction=mask)


def item(attention, embeds, text, features=None, segments=None, family="llava", instruction=None) -> MediaItem:
    lazy = {"token_attention": lambda: attention}
    if features is not None:
        lazy["vision_features"] = lambda: features
    out = MediaItem(embeds, segments or [Segment(0, 4, embeds.shape[0] // 4)], family=family, lazy=lazy)
    out.prompt = prompt(text, instruction)
    return out


def fixture(seed: int, n: int = 32, length: int = 4, heads: int = 2, dim: int = 12, feature_dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    attention = torch.rand(heads, n, generator=g)
    embeds = torch.randn(n, dim, generator=g)
    text = torch.randn(length, dim, generator=g) * torch.rand(length, 1, generator=g) * 3  # unequal norms
    return attention, embeds, text, torch.randn(n, feature_dim, generator=g)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def min_max(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


def rule(attention, embeds, text, features, k, important_ratio=0.5, eta=0.5, temperature=0.01,
         text_temperature=0.05, gamma=2.5, top_p=0.005, gating=False) -> list[int]:
    """FlashVLM with numpy (float64): relevance = min-max(softmax_i(sum_l softmax_l(S / tt) S / T) ** gamma), damped by
    0.1 below the 1 - top_p quantile, min-max again; saliency = min-max(head mean); score = A^(1-eta) R^eta (clamped
    at 1e-6); the top int(k * ratio) by score, then VisPruner's rounds over the rest on the features."""
    a, v, t, h = (x.double().numpy() for x in (attention, embeds, text, features))
    saliency = min_max(a.mean(0))
    unit = normalise(t)
    if gating:
        norms = np.linalg.norm(t, axis=1)
        unit = unit * (norms / (norms.max() + 1e-6))[:, None]
    s = normalise(v) @ unit.T
    pooled = (softmax(s / text_temperature, axis=1) * s).sum(1)
    relevance = min_max(softmax(pooled / temperature, axis=0) ** gamma)
    relevance = np.where(relevance >= np.quantile(relevance, 1 - top_p), relevance, 0.1 * relevance)
    relevance = min_max(relevance)
    score = np.maximum(saliency, 1e-6) ** (1 - eta) * np.maximum(relevance, 1e-6) ** eta
    ranked = np.sort(score)
    assert np.all(np.diff(ranked) > 1e-9 * ranked[-1]), "the fixture has a near-tie in the fused score"
    order = [int(i) for i in np.argsort(-score, kind="stable")]
    important_count = int(k * important_ratio)
    important, rest = order[:important_count], order[important_count:]
    diverse = k - important_count
    h = normalise(h)
    rest = rest if diverse else []
    rest = duplicate_rounds(rest, h, diverse)
    return sorted(important + rest)


@pytest.mark.parametrize("seed, k, settings", [
    (0, 4, {}),
    (1, 6, {}),
    (2, 5, {"important_ratio": 0.2}),
    (3, 4, {"eta": 0.8, "temperature": 0.05}),
    (4, 6, {"top_p": 0.5, "gamma": 1.0}),
    (5, 4, {"text_temperature": 0.5, "important_ratio": 1.0}),
    (6, 4, {"important_ratio": 0.0}),
    (7, 8, {"temperature": 1.0, "gamma": 1.0, "top_p": 1.0, "eta": 0.3}),  # relevance spread: both terms order
    (8, 8, {"temperature": 0.2, "gamma": 1.5, "top_p": 0.25, "eta": 0.6}),
])
def test_kept_indices_equal_the_rule(seed, k, settings):
    attention, embeds, text, features = fixture(seed)
    kept = mmprune.get("flashvlm", **settings).select(item(attention, embeds, text, features), k).slots.tolist()
    assert kept == rule(attention, embeds, text, features, k, **settings)


def test_the_text_moves_the_selection():
    """eta 1 and no diverse part: the kept token is the one a one-token text points at."""
    attention, embeds, _, features = fixture(7)
    pruner = mmprune.get("flashvlm", eta=1.0, important_ratio=1.0)
    for target in (3, 11):
        text = embeds[target : target + 1] * 2.0
        assert pruner.select(item(attention, embeds, text, features), 1).slots.tolist() == [target]


def test_text_tokens_are_pooled_by_a_soft_maximum():
    """Token 0 has cosines (0.71, -0.71) to the two text tokens, token 1 (0.67, 0.67), token 2 (0, 0). At the default
    text temperature (0.05) the pooling is close to the maximum: token 0 leads; at 10 it is close to the mean: token 1
    leads."""
    e = torch.eye(3)
    embeds = torch.stack([e[0] - e[1], e[0] + e[1] + 0.5 * e[2], e[2]] * 4)  # 12 tokens, a 4 x 3 grid
    tokens = item(torch.rand(2, 12), embeds, e[:2], embeds)
    sharp = mmprune.get("flashvlm", eta=1.0, important_ratio=1.0)
    soft = mmprune.get("flashvlm", eta=1.0, important_ratio=1.0, text_temperature=10.0)
    assert sharp.select(tokens, 1).slots.tolist() == [0]
    assert soft.select(tokens, 1).slots.tolist() == [1]


def test_equal_scores_go_to_the_lowest_index():
    tokens = item(torch.ones(2, 16), torch.ones(16, 4), torch.ones(2, 4), torch.ones(16, 3))
    assert mmprune.get("flashvlm", important_ratio=1.0).select(tokens, 5).slots.tolist() == [0, 1, 2, 3, 4]


def test_without_text_weight_it_is_vispruner():
    attention, embeds, text, features = fixture(8)
    tokens = item(attention, embeds, text, features)
    for k in (4, 7):
        flash = mmprune.get("flashvlm", eta=0.0).select(tokens, k).slots.tolist()
        assert flash == mmprune.get("vispruner").select(tokens, k).slots.tolist()


def test_prompt_or_instruction_text():
    attention, embeds, text, features = fixture(9, length=6)
    instruction = [False, False, False, True, True, False]
    tokens = item(attention, embeds, text, features, instruction=instruction)
    whole = mmprune.get("flashvlm").select(tokens, 4).slots.tolist()
    own = mmprune.get("flashvlm", text="instruction").select(tokens, 4).slots.tolist()
    assert whole == rule(attention, embeds, text, features, 4)
    assert own == rule(attention, embeds, text[3:5], features, 4)
    assert whole != own


def test_norm_gating_follows_the_family_code_by_default():
    attention, embeds, text, features = fixture(0)
    gated = rule(attention, embeds, text, features, 4, gating=True)
    plain = rule(attention, embeds, text, features, 4, gating=False)
    assert gated != plain
    default = mmprune.get("flashvlm")
    assert default.select(item(attention, embeds, text, features, family="qwen2-vl"), 4).slots.tolist() == gated
    assert default.select(item(attention, embeds, text, features, family="llava"), 4).slots.tolist() == plain
    forced = mmprune.get("flashvlm", norm_gating=True)
    assert forced.select(item(attention, embeds, text, features, family="llava"), 4).slots.tolist() == gated


def test_without_encoder_features_the_partition_compares_the_projected_tokens():
    attention, embeds, text, features = fixture(1)
    kept = mmprune.get("flashvlm").select(item(attention, embeds, text), 6).slots.tolist()
    assert kept == rule(attention, embeds, text, embeds, 6)
    assert kept != rule(attention, embeds, text, features, 6)


def test_newline_tokens_are_not_candidates():
    """A 4 x 8 grid with LLaVA-NeXT newlines (36 tokens, newlines at 8, 17, 26, 35, with zero attention and features
    as the adapter gives them) keeps the patches the 32 tokens without newlines keep; beyond the patches, the first
    newline."""
    attention, embeds, text, features = fixture(12)
    plain = mmprune.get("flashvlm").select(item(attention, embeds, text, features), 6).slots.tolist()
    grid = Segment(0, 4, 8, newline=True)
    patches = grid.patch_indices().reshape(-1)
    packed_attention, packed_embeds = torch.zeros(2, 36), torch.ones(36, embeds.shape[1])
    packed_features = torch.zeros(36, features.shape[1])
    packed_attention[:, patches], packed_embeds[patches], packed_features[patches] = attention, embeds, features
    tokens = item(packed_attention, packed_embeds, text, packed_features, segments=[grid])
    assert mmprune.get("flashvlm").select(tokens, 6).slots.tolist() == patches[plain].tolist()
    assert mmprune.get("flashvlm").select(tokens, 33).slots.tolist() == [i for i in range(36) if i not in (17, 26, 35)]


def test_bad_fields_fail_at_get_naming_the_field():
    for field, value in [("eta", 1.5), ("important_ratio", -0.1), ("temperature", 0), ("gamma", -1.0),
                         ("top_p", 2.0), ("text", "question"), ("norm_gating", "yes"), ("text_temperature", None)]:
        with pytest.raises(ValueError, match=f"flashvlm: {field}="):
            mmprune.get("flashvlm", **{field: value})


def test_an_item_without_a_prompt_is_an_error():
    attention, embeds, text, features = fixture(13)
    bare = item(attention, embeds, text, features)
    bare.prompt = None
    with pytest.raises(RuntimeError, match="flashvlm reads the prompt"):
        mmprune.get("flashvlm").select(bare, 4)
