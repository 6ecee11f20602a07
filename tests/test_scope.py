"""SCOPE: the greedy saliency x coverage-gain rule against the set-coverage definition, alpha, which features and
saliency it reads, newline tokens, and its hyper-parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmprune
from mmprune.media import MediaItem, Segment
from mmprune.methods.scope import SCOPEPruner, scope_select


def coverage(sim: np.ndarray, chosen: list[int]) -> float:
    """The paper's set coverage: every token counts its best (non-negative) similarity to the chosen set."""
    if not chosen:
        return 0.0
    return float(np.maximum(sim[:, chosen].max(axis=1), 0.0).sum())


def scope_reference(x: np.ndarray, a: np.ndarray, k: int, alpha: float = 1.0) -> list[int]:
    """Each step: the unselected token maximising (f(S + j) - f(S)) * a_j ** alpha, f recomputed from the set;
    ties to the lowest index."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u @ u.T
    chosen: list[int] = []
    for _ in range(k):
        base = coverage(sim, chosen)
        best, best_score = None, -np.inf
        for j in range(len(a)):
            if j in chosen:
                continue
            score = (coverage(sim, chosen + [j]) - base) * a[j] ** alpha
            if score > best_score + 1e-12:
                best, best_score = j, score
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("alpha, k", [(1.0, 6), (0.0, 5), (2.5, 8), (0.5, 12)])
def test_greedy_matches_the_set_coverage_definition(alpha, k):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 10, generator=g, dtype=torch.float64)
    a = torch.rand(24, generator=g, dtype=torch.float64)
    assert scope_select(x, a, k, alpha).tolist() == scope_reference(x.numpy(), a.numpy(), k, alpha)


def cluster_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens 0-3 form a tight cluster around e0 (token 0 its centre); token 4 stands alone (e1) and is the most
    salient; token 5 is a near-copy of token 4."""
    e = torch.eye(4)
    x = torch.stack([e[0], e[0] + 0.2 * e[2], e[0] - 0.2 * e[2], e[0] + 0.2 * e[3], e[1], e[1] + 0.1 * e[3]])
    return x, torch.tensor([0.1, 0.1, 0.1, 0.1, 0.3, 0.25])


def test_alpha_zero_is_coverage_alone_and_saliency_breaks_it():
    x, a = cluster_case()
    # coverage alone: the cluster's centre covers four tokens, then the e1 pair's most central member
    assert scope_select(x, a, 2, alpha=0.0).tolist() == [0, 4]
    # saliency 0.3 vs 0.1: the lone salient token first (gain ~2 x 0.3 > ~4 x 0.1), then the cluster centre, and
    # never token 5 until the cluster is covered: its gain after token 4 is ~0
    assert scope_select(x, a, 2, alpha=1.0).tolist() == [4, 0]
    assert 5 not in scope_select(x, a, 4, alpha=1.0).tolist()


def test_ties_go_to_the_lowest_index():
    assert scope_select(torch.eye(5), torch.ones(5), 3).tolist() == [0, 1, 2]


def item(attention, embeds, features=None, segments=None) -> MediaItem:
    lazy = {"token_attention": lambda: attention}
    if features is not None:
        lazy["vision_features"] = lambda: features
    return MediaItem(embeds, segments or [Segment(0, 1, embeds.shape[0])], lazy=lazy)


def test_clip_towers_compare_the_encoder_features_not_the_embeddings():
    """With vision_features (LLaVA: the feature layer's hidden states) the similarity is theirs; the projected
    embeddings are chosen here to give a different answer."""
    g = torch.Generator().manual_seed(5)
    features, embeds = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    attention = torch.rand(2, 12, generator=g)
    a = attention.mean(0).numpy()
    on_features = sorted(scope_reference(features.numpy(), a, 4))
    on_embeds = sorted(scope_reference(embeds.numpy(), a, 4))
    assert on_features != on_embeds
    pruner = mmprune.get("scope", keep=4)
    assert pruner.prune_image(item(attention, embeds, features)).kept() == on_features
    # no encoder features (Qwen): the LLM input embeddings
    assert pruner.prune_image(item(attention, embeds)).kept() == on_embeds


def test_newline_tokens_are_left_out():
    """LLaVA-NeXT layout: rows of two patches and a newline (indices 2, 5). The newlines are orthogonal to the
    duplicate patches, so they would add the most coverage were they candidates."""
    e = torch.eye(6)
    embeds = torch.stack([e[0], e[0], e[1], e[0], e[0], e[2]])
    attention = torch.tensor([[0.1, 0.4, 0.0, 0.3, 0.2, 0.0]])
    segments = [Segment(0, 2, 2, newline=True)]
    patches = [0, 1, 3, 4]
    picked = scope_reference(embeds[patches].numpy(), attention[0, patches].numpy(), 3)
    kept = mmprune.get("scope", keep=3).prune_image(item(attention, embeds, segments=segments)).kept()
    assert kept == sorted(patches[i] for i in picked) and 2 not in kept and 5 not in kept
    filled = mmprune.get("scope", keep=5).prune_image(item(attention, embeds, segments=segments))
    assert filled.kept() == [0, 1, 2, 3, 4]


def test_scope_reads_no_prompt():
    assert SCOPEPruner.reads_prompt is False and mmprune.get("scope").reads_prompt is False


@pytest.mark.parametrize("alpha", [-0.5, float("inf"), float("nan"), "1", True])
def test_bad_alpha_fails_at_get(alpha):
    with pytest.raises(ValueError, match=r"scope: alpha=.* is not valid: expected a number in \[0, inf\]"):
        mmprune.get("scope", alpha=alpha)
