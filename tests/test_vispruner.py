"""VisPruner: the important / diverse split, the round-by-round duplicate removal (its list order included), which
features it compares, newline tokens, and the no-[CLS] path on Qwen2-VL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import record_selects, tiny_model

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods.vispruner import VisPrunerPruner, remove_duplicates


def basis(dim: int = 32):
    return torch.eye(dim)


def two_round_features() -> torch.Tensor:
    """20 candidates. Round 1 (R = 20, keep 10, r = 8): the even ones c0..c14 each duplicate c(i+1) and go; c16
    (best 0.2, to c17) and c18 (best 0.5, to c19) stay, listed by descending score: c18 first."""
    e = basis()
    c = [None] * 20
    for i in range(1, 20, 2):
        c[i] = e[i]
    c[3] = 0.95 * e[1] + math.sqrt(1 - 0.95 ** 2) * e[3]
    for i in range(0, 16, 2):
        c[i] = c[i + 1]
    c[16] = 0.2 * e[17] + 0.8 * e[20] + math.sqrt(1 - 0.04 - 0.64) * e[21]
    c[18] = 0.5 * e[19] + math.sqrt(0.75) * e[20]
    return torch.stack(c)


def test_each_round_drops_the_a_tokens_most_similar_to_b_and_reorders_the_list():
    """Round 2 (R = 12, r = 2) splits [c18, c16, c1, c3, ..., c19]: A = [c18, c1, c5, c9, c13, c17],
    B = [c16, c3, c7, c11, c15, c19]; c1 (0.95 to c3) and c18 (0.69 to c16) go; the other A tokens follow by
    descending score (c17: 0.2 to c16, then the zeros in list order), then B. Had the survivors kept their original
    order (c16 first), c16 would have been in A and gone instead of c18."""
    out = remove_duplicates(two_round_features(), torch.arange(20), 10)
    assert out.tolist() == [17, 5, 9, 13, 16, 3, 7, 11, 15, 19]


def test_r_is_capped_at_the_a_half():
    """R = 6, keep 2: r = min(8, 4, 3) = 3 drops all of A = [c0, c2, c4]; then R = 3: r = min(8, 1, 2) = 1 drops the
    A token (c1 or c5) closer to B = [c3]."""
    e = basis()
    x = torch.stack([e[0], e[1], e[2], e[3], e[4], 0.6 * e[3] + 0.8 * e[5]])
    assert remove_duplicates(x, torch.arange(6), 2).tolist() == [1, 3]


def item(attention, embeds, features=None, segments=None):
    attention = torch.tensor(attention, dtype=torch.float32)
    lazy = {"token_attention": lambda: attention.unsqueeze(0)}
    if features is not None:
        lazy["vision_features"] = lambda: features
    return MediaItem(embeds, segments or [Segment(0, 1, len(attention))], lazy=lazy)


ATTENTION = [8, 7, 6, 5, 4, 3, 2, 1]


def features_with(duplicate: int) -> torch.Tensor:
    """Eight orthogonal tokens, except ``duplicate`` which copies token 5."""
    x = basis()[:8].clone()
    x[duplicate] = x[5]
    return x


@pytest.mark.parametrize("ratio, k, expected", [
    (0.5, 4, [0, 1, 5, 7]),  # 2 important; candidates [2..7]: A [2, 4, 6] go; then [3, 5, 7]: 3 (copy of 5) goes
    (1.0, 4, [0, 1, 2, 3]),  # FasterVLM
    (0.0, 4, [1, 3, 5, 7]),  # all diverse: A = [0, 2, 4, 6] go in one round
    (0.75, 4, [0, 1, 2, 6]),  # 3 important; [3..7]: A [3, 5, 7] go; then [4, 6]: r = 1 drops 4
    (0.5, 5, [0, 1, 3, 5, 7]),  # int(2.5) = 2 important, 3 diverse: [2..7] -> [3, 5, 7] by r = 3
])
def test_important_diverse_split(ratio, k, expected):
    tokens = item(ATTENTION, features_with(3))
    assert VisPrunerPruner(important_ratio=ratio).select(tokens, k).slots.tolist() == expected


def test_similarity_uses_pre_projector_features_when_the_model_has_them():
    """Embeddings say 7 copies 5, the encoder's features say 3 does: the features decide (LLaVA's
    hidden_states[-2]); without them the embeddings do."""
    with_features = item(ATTENTION, features_with(7), features=features_with(3))
    assert VisPrunerPruner().select(with_features, 4).slots.tolist() == [0, 1, 5, 7]
    assert VisPrunerPruner().select(item(ATTENTION, features_with(7)), 4).slots.tolist() == [0, 1, 3, 5]


def test_newline_tokens_are_never_candidates():
    """LLaVA-NeXT layout: newlines (6, 9) are neither important nor diverse, unless the budget exceeds the rest."""
    segments = [Segment(0, 2, 2), Segment(4, 2, 2, newline=True)]
    attention = [1, 2, 3, 4, 5, 6, 99, 7, 8, 99]
    tokens = item(attention, basis()[:10].clone(), segments=segments)
    kept = VisPrunerPruner(important_ratio=0.5).select(tokens, 6).slots.tolist()
    assert 6 not in kept and 9 not in kept and {8, 7, 5} <= set(kept)
    assert VisPrunerPruner().select(tokens, 9).slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]


def reference_vispruner(a: np.ndarray, x: np.ndarray, k: int, ratio: float = 0.5) -> list[int]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    order = [int(i) for i in np.argsort(-a, kind="stable")]
    important, rest = order[:int(k * ratio)], order[int(k * ratio):]
    diverse = k - len(important)
    while len(rest) > diverse:
        even, odd = rest[0::2], rest[1::2]
        r = min(8, len(rest) - diverse, len(even))
        best = (x[even] @ x[odd].T).max(1)
        rest = [even[i] for i in np.argsort(-best, kind="stable")[r:]] + odd
    return sorted(important + rest)


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_ranks_by_received_attention_and_compares_llm_input_embeddings(family_name, monkeypatch):
    seen = record_selects(monkeypatch, VisPrunerPruner)
    model = tiny_model(family_name)
    pruner = mmprune.get("vispruner", keep=8)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(family_name, [[3, ("img", 1), 4]]))
    (tokens, k), = seen
    assert tokens.num_tokens == 24 and k == 8 and not tokens.has("vision_features")
    expected = reference_vispruner(tokens.token_attention.mean(0).double().numpy(),
                                   tokens.embeds.double().numpy(), k)
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl", "llava_next"])
def test_all_important_is_fastervlm(family_name):
    model = tiny_model(family_name)
    inputs = tiny.batch(family_name, [[3, ("img", 0), 4]])
    kept = []
    for pruner in (mmprune.get("vispruner", keep=6, important_ratio=1.0), mmprune.get("fastervlm", keep=6)):
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
        kept.append(pruner.stats["samples"][0]["images"][0]["kept"])
    assert kept[0] == kept[1]


def test_vispruner_checks_the_ratio():
    with pytest.raises(ValueError, match="important_ratio"):
        mmprune.get("vispruner", important_ratio=1.5)
