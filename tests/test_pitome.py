"""PiToMe: the energy score, the protected / mergeable split, the merged embeddings and the steps to the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods import pitome
from mmprune.methods.pitome import pitome_energy, pitome_merge

# three near-duplicates along x (tokens 0, 2, 4), two orthogonal tokens (1, 3) and one opposite token (5)
X = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [1.0, 0.2, 0.0],
                  [-1.0, 0.0, 0.0]])


def elu(v: float, alpha: float) -> float:
    return v if v > 0 else alpha * (math.exp(v) - 1)


@pytest.mark.parametrize(("margin", "alpha"), [(0.5, 1.0), (0.2, 0.5)])
def test_energy_is_the_mean_elu_of_the_shifted_cosines(margin, alpha):
    rows = [[float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for b in X.numpy()] for a in X.numpy()]
    expected = [sum(elu(c - margin, alpha) for c in row) / len(row) for row in rows]  # self included
    torch.testing.assert_close(pitome_energy(X, margin, alpha), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_the_most_energetic_tokens_merge_and_the_rest_are_protected():
    """margin 0.5: energies rank 4, 2, 0 (the near-duplicates), then 1, 3, 5. r = 2: tokens 4, 2, 0, 1 are mergeable,
    A = ranks 0 and 2 (tokens 4, 0), B = ranks 1 and 3 (tokens 2, 1); 4 and 0 both join 2 (their most similar B).
    Tokens 3 and 5 are protected and come first, in descending energy, then the B tokens in rank order."""
    energy = pitome_energy(X, 0.5, 1.0)
    assert torch.argsort(energy, descending=True).tolist() == [4, 2, 0, 1, 3, 5]
    merged, slots, size = pitome_merge(X, torch.arange(6), torch.ones(6), 2, 0.5, 1.0, weighted=False)
    assert slots.tolist() == [3, 5, 2, 1] and size.tolist() == [1.0, 1.0, 3.0, 1.0]
    torch.testing.assert_close(merged, torch.stack([X[3], X[5], (X[0] + X[2] + X[4]) / 3, X[1]]))


def test_weighted_merging_weights_each_token_by_what_it_holds():
    size = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 1.0])  # token 4 already holds 3 original tokens
    merged, _, new_size = pitome_merge(X, torch.arange(6), size, 2, 0.5, 1.0, weighted=True)
    assert new_size.tolist() == [1.0, 1.0, 5.0, 1.0]
    torch.testing.assert_close(merged[2], (X[0] + X[2] + 3 * X[4]) / 5)
    plain, _, _ = pitome_merge(X, torch.arange(6), size, 2, 0.5, 1.0, weighted=False)  # the LLaVA patch's mean
    torch.testing.assert_close(plain[2], (X[0] + X[2] + X[4]) / 3)


def independent(x: np.ndarray, k: int, ratio: float, margin: float, alpha: float, weighted: bool):
    """PiToMe's steps with numpy and Python loops: slots, merged embeddings and sizes."""
    slots, size = list(range(len(x))), [1.0] * len(x)
    while len(x) > k:
        n = len(x)
        r = min(max(1, math.floor(n - n * ratio)), n // 2, n - k)
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = u @ u.T
        energy = [sum(elu(c - margin, alpha) for c in row) / n for row in sim]
        rank = sorted(range(n), key=lambda i: (-energy[i], i))
        a, b, protected = rank[:2 * r:2], rank[1:2 * r:2], rank[2 * r:]
        groups = {j: [j] for j in b}
        for i in a:
            groups[max(b, key=lambda j: (sim[i, j], -b.index(j)))].append(i)
        w = [[size[i] if weighted else 1.0 for i in groups[j]] for j in b]
        merged = [sum(wi * x[i] for wi, i in zip(ws, groups[j])) / sum(ws) for ws, j in zip(w, b)]
        x = np.stack([x[i] for i in protected] + merged)
        slots = [slots[i] for i in protected] + [slots[j] for j in b]
        size = [size[i] for i in protected] + [sum(size[i] for i in groups[j]) for j in b]
    return slots, x, size


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("k", "ratio", "margin"), [(4, 0.9, 0.5), (6, 0.75, 0.2), (5, 0.5, 0.5)])
def test_merged_embeddings_equal_an_independent_computation(weighted, k, ratio, margin):
    embeds = torch.randn(16, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    tokens = MediaItem(embeds, [Segment(0, 4, 4)])
    pruner = mmprune.get("pitome", keep=k, ratio=ratio, margin=margin, weighted=weighted)
    selection = pruner.select(tokens, k)
    slots, merged, size = independent(embeds.numpy(), k, ratio, margin, 1.0, weighted)
    assert selection.slots.tolist() == slots and selection.count == k
    assert selection.merged == sum(s > 1 for s in size)
    torch.testing.assert_close(selection.embeds, torch.from_numpy(merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("ratio", "steps"), [(0.9, [1] * 12), (0.75, [4, 3, 2, 1, 1, 1]), (0.5, [8, 4])])
def test_each_step_removes_floor_n_minus_n_ratio_tokens(monkeypatch, ratio, steps):
    """16 -> 4; ratio 0.5 is ToMe's r = min(n - keep, n // 2) schedule."""
    seen = []
    original = pitome.pitome_merge

    def spy(x, slots, size, r, *args):
        seen.append(r)
        return original(x, slots, size, r, *args)

    monkeypatch.setattr(pitome, "pitome_merge", spy)
    tokens = MediaItem(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), [Segment(0, 4, 4)])
    assert mmprune.get("pitome", ratio=ratio).select(tokens, 4).count == 4
    assert seen == steps


def test_on_qwen2_vl_every_output_keeps_an_original_slot():
    model = tiny_model("qwen2_vl")
    inputs = tiny.batch("qwen2_vl", [[3, ("img", 1), 4]])  # 24 tokens
    pruner = mmprune.get("pitome", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    image = pruner.stats["samples"][0]["images"][0]
    assert image["before"] == 24 and image["after"] == 6 and len(set(image["kept"])) == 6 and image["merged"] >= 1


@pytest.mark.parametrize(("field", "value"), [("ratio", 0.4), ("ratio", 1.0), ("margin", 1.5), ("alpha", -1.0),
                                              ("weighted", 1)])
def test_bad_hyper_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"pitome: {field}={value!r} is not valid"):
        mmprune.get("pitome", **{field: value})
