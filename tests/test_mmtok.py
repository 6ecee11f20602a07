"""MMTok: the greedy facility-location coverage against a brute-force greedy, the coverage matrix against the rule
written with numpy, which features each term compares, the per-family temperature, newline tokens and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmprune
from mmprune.media import MediaItem, Segment
from mmprune.methods.mmtok import greedy_coverage
from mmprune.prompt import PromptText


def prompt(text: torch.Tensor, instruction: list[bool] | None = None) -> PromptText:
    count = text.shape[0]
    mask = torch.ones(count, dtype=torch.bool) if instruction is None else torch.tensor(instruction)
    return PromptText(ids=torch.arange(count), embeds=text, positions=torch.arange(count), instruction=mask)


def item(embeds, text, features=None, segments=None, family="llava", instruction=None) -> MediaItem:
    lazy = {} if features is None else {"vision_features": lambda: features}
    out = MediaItem(embeds, segments or [Segment(0, 1, embeds.shape[0])], family=family, lazy=lazy)
    out.prompt = prompt(text, instruction)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def brute_force_greedy(cover: np.ndarray, k: int) -> list[int]:
    """``k`` times the candidate with the largest ``f(S + {j}) - f(S)``, ``f(S) = sum_r max_{s in S} cover[r, s]``
    evaluated explicitly; ties to the lowest index. Fails on a near-tie (float32 and float64 could order it apart)."""
    def f(chosen: list[int]) -> float:
        return float(cover[:, chosen].max(axis=1).sum()) if chosen else 0.0

    chosen: list[int] = []
    for _ in range(k):
        gains = sorted(((f(chosen + [j]) - f(chosen), -j) for j in range(cover.shape[1]) if j not in chosen),
                       reverse=True)
        if len(gains) > 1:  # exact ties (e.g. all gains 0 once everything is covered) go to the lowest index
            margin = gains[0][0] - gains[1][0]
            assert margin == 0 or margin > 1e-6, "the fixture has a near-tie"
        chosen.append(-gains[0][1])
    return chosen


def rule(text, embeds, features, k, text_temperature=0.02, vision_temperature=0.2, alpha=0.5) -> list[int]:
    """MMTok with numpy (float64): P = softmax_j(cos(text, embeds) / tv) / m, Q = softmax_j(cos(features) / vv) / n,
    brute-force greedy on [P; alpha Q]; kept in original order."""
    t, v, x = (a.double().numpy() for a in (text, embeds, features))
    p = softmax(cosine(t, v) / text_temperature) / t.shape[0]
    q = softmax(cosine(x, x) / vision_temperature) / v.shape[0]
    return sorted(brute_force_greedy(np.vstack([p, alpha * q]), k))


def fixture(seed: int, n: int = 12, m: int = 3, dim: int = 16, feature_dim: int = 10):
    g = torch.Generator().manual_seed(seed)
    text, embeds = torch.randn(m, dim, generator=g), torch.randn(n, dim, generator=g)
    return text, embeds, torch.randn(n, feature_dim, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_greedy_picks_as_the_brute_force_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    cover = torch.rand(15, 9, generator=g, dtype=torch.float64) ** 3  # skewed, so coverage saturates unevenly
    order = greedy_coverage(cover, 9)
    assert order.tolist() == brute_force_greedy(cover.numpy(), 9)


def test_greedy_ties_go_to_the_lowest_index_and_a_pick_is_never_repeated():
    cover = torch.tensor([[1.0, 0.0, 1.0, 0.0],
                          [0.0, 1.0, 0.0, 1.0]])
    # columns 0 and 2 (1 and 3) are identical; once both rows are covered every gain is 0: lowest unchosen index
    assert greedy_coverage(cover, 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("seed, k, alpha", [(0, 4, 0.5), (1, 3, 0.5), (2, 6, 0.5), (3, 4, 0.0), (4, 4, 5.0)])
def test_kept_indices_equal_the_rule_with_encoder_features(seed, k, alpha):
    text, embeds, features = fixture(seed)
    pruner = mmprune.get("mmtok", keep=k, alpha=alpha)
    kept = pruner.select(item(embeds, text, features), k).slots.tolist()
    assert kept == rule(text, embeds, features, k, alpha=alpha)


def test_without_encoder_features_the_vision_term_compares_the_projected_tokens():
    text, embeds, features = fixture(5)
    kept = mmprune.get("mmtok").select(item(embeds, text), 4).slots.tolist()
    assert kept == rule(text, embeds, embeds, 4)
    assert kept != rule(text, embeds, features, 4)  # the features would have chosen differently


def test_only_the_instruction_is_covered():
    text, embeds, features = fixture(6, m=5)
    instruction = [False, False, True, True, False]  # template tokens around a two-token instruction
    kept = mmprune.get("mmtok").select(item(embeds, text, features, instruction=instruction), 4).slots.tolist()
    assert kept == rule(text[2:4], embeds, features, 4)
    assert kept != rule(text, embeds, features, 4)


def test_the_question_steers_the_choice():
    """Three orthogonal clusters of four; a one-token question along a cluster's direction puts the only token of
    that budget into that cluster."""
    e = torch.eye(8)
    g = torch.Generator().manual_seed(0)
    embeds = torch.cat([e[c] + 0.05 * torch.randn(4, 8, generator=g) for c in range(3)])
    for cluster in range(3):
        kept = mmprune.get("mmtok").select(item(embeds, e[cluster : cluster + 1], embeds), 1).slots.tolist()
        assert kept[0] // 4 == cluster


def test_the_text_temperature_defaults_to_the_family_reference():
    text, embeds, features = fixture(26, dim=4, feature_dim=4)  # close cosines: 0.01 and 0.02 choose apart
    default = mmprune.get("mmtok")
    llava = default.select(item(embeds, text, features, family="llava-next"), 4).slots.tolist()
    qwen = default.select(item(embeds, text, features, family="qwen2-vl"), 4).slots.tolist()
    assert llava == rule(text, embeds, features, 4, text_temperature=0.02)
    assert qwen == rule(text, embeds, features, 4, text_temperature=0.01)
    assert llava != qwen
    explicit = mmprune.get("mmtok", text_temperature=0.02)
    assert explicit.select(item(embeds, text, features, family="qwen2-vl"), 4).slots.tolist() == llava


def test_newline_tokens_are_neither_covered_nor_kept():
    """A 3 x 4 grid with LLaVA-NeXT newlines (15 tokens, newlines at 4, 9, 14) keeps the patches the same 12 tokens
    without newlines keep; a budget beyond the patches takes the first newline."""
    text, embeds, features = fixture(8)
    plain = mmprune.get("mmtok").select(item(embeds, text, features), 5).slots.tolist()
    grid = Segment(0, 3, 4, newline=True)
    patches = grid.patch_indices().reshape(-1)
    packed_embeds = torch.ones(15, embeds.shape[1])  # any newline embedding: newlines are not candidates
    packed_features = torch.zeros(15, features.shape[1])  # the adapters give newlines zero features
    packed_embeds[patches], packed_features[patches] = embeds, features
    packed = item(packed_embeds, text, packed_features, segments=[grid])
    assert mmprune.get("mmtok").select(packed, 5).slots.tolist() == patches[plain].tolist()
    assert mmprune.get("mmtok").select(packed, 13).slots.tolist() == [i for i in range(15) if i not in (9, 14)]


def test_bad_fields_fail_at_get_naming_the_field():
    for field, value in [("alpha", -0.1), ("text_temperature", 0.0), ("vision_temperature", "warm")]:
        with pytest.raises(ValueError, match=f"mmtok: {field}="):
            mmprune.get("mmtok", **{field: value})


def test_an_item_without_a_prompt_is_an_error():
    text, embeds, features = fixture(9)
    bare = item(embeds, text, features)
    bare.prompt = None
    with pytest.raises(RuntimeError, match="mmtok reads the prompt"):
        mmprune.get("mmtok").select(bare, 4)
