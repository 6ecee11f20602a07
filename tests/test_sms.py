"""Sparsity Meets Similarity: the knee of the sorted similarity curve, keep as a cap, the substitute without [CLS]."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods.sms import knee_count

HEAD_THEN_TAIL = [0.9, 0.85, 0.8, 0.2, 0.19, 0.18, 0.17, 0.16]  # a head of three, then a flat tail


def chord_knee(curve: list[float]) -> int:
    """Largest signed distance below the line through the first and last points (point-line formula)."""
    n = len(curve)
    if n <= 2:  # two points are their own chord
        return n
    dx, dy = n - 1, curve[-1] - curve[0]
    below = [-(dx * (y - curve[0]) - dy * i) / math.hypot(dx, dy) for i, y in enumerate(curve)]
    knee = max(range(n), key=lambda i: (below[i], -i))
    return knee if below[knee] > 1e-12 else n


@pytest.mark.parametrize(("curve", "expected"), [
    (HEAD_THEN_TAIL, 3),  # the first tail point is the knee: the three before it stay
    ([1.0, 0.2, 0.1, 0.05, 0.0], 1),
    ([0.5] * 6, 6),  # flat: no tail, no knee
    ([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], 6),  # a straight line has no point below its chord
    ([1.0, 0.99, 0.98, 0.97, 0.0], 5),  # concave: the curve is above its chord
    ([0.7, 0.1], 2),
    ([0.3], 1),
])
def test_the_knee_of_a_hand_built_curve(curve, expected):
    assert knee_count(torch.tensor(curve)) == expected == chord_knee(curve)


def test_the_knee_of_a_long_tail_does_not_depend_on_the_axes_scales():
    curve = [math.exp(-i / 4) for i in range(40)]
    knee = knee_count(torch.tensor(curve))
    assert 1 < knee < 20 and knee == chord_knee(curve)
    assert knee_count(torch.tensor([3 * y - 7 for y in curve])) == knee


def item_with_cls(similarities: list[float], embeds: torch.Tensor | None = None) -> MediaItem:
    """A LLaVA-like image whose patch features have the given cosines to its [CLS] feature."""
    n = len(similarities)
    features = torch.tensor([[c, math.sqrt(1 - c * c), 0.0] for c in similarities]) * 2.0
    embeds = torch.randn(n, 4, generator=torch.Generator().manual_seed(0)) if embeds is None else embeds
    lazy = {"vision_features": lambda: features, "cls_feature": lambda: torch.tensor([0.5, 0.0, 0.0])}
    return MediaItem(embeds, [Segment(0, 1, n)], family="llava", lazy=lazy)


SHUFFLED = [0.2, 0.9, 0.19, 0.85, 0.18, 0.8, 0.17, 0.16]  # HEAD_THEN_TAIL's values; the head is tokens 1, 3, 5


def test_the_knee_decides_below_the_cap_and_says_so():
    selection = mmprune.get("sms", keep=6).select(item_with_cls(SHUFFLED), 6)
    assert selection.slots.tolist() == [1, 3, 5] and selection.embeds is None
    assert "after 3 of 8 tokens; 3 kept (the knee decided)" in selection.note
    assert "cosine to [CLS] (pre-projector features)" in selection.note


def test_keep_caps_the_count_with_the_most_similar_tokens():
    selection = mmprune.get("sms", keep=2).select(item_with_cls(SHUFFLED), 2)
    assert selection.slots.tolist() == [1, 3]
    assert "after 3 of 8 tokens; 2 kept (the cap keep=2 decided)" in selection.note


def test_without_cls_the_mean_token_is_the_reference_and_newlines_are_off_the_curve():
    """A LLaVA-NeXT-like grid of 2 rows x 4 patches, each row closed by a newline token (indices 4 and 9)."""
    embeds = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    embeds[[4, 9]] = 5.0  # newline tokens, far from everything: they must not be on the curve nor in the mean
    tokens = MediaItem(embeds, [Segment(0, 2, 4, newline=True)], family="qwen2_vl")
    selection = mmprune.get("sms", keep=8).select(tokens, 8)
    patches = [0, 1, 2, 3, 5, 6, 7, 8]
    x = embeds[patches].double().numpy()
    mean = x.mean(0)
    cos = x @ mean / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean))
    order = np.argsort(-cos, kind="stable")
    count = min(chord_knee(cos[order].tolist()), 8)
    assert selection.slots.tolist() == sorted(patches[i] for i in order[:count])
    assert f"after {chord_knee(cos[order].tolist())} of 8 tokens" in selection.note
    assert "cosine to the mean token (projected tokens)" in selection.note


def test_on_llava_the_count_is_the_knee_of_the_cls_cosines_at_the_feature_layer():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4], [2, ("img", 2), 5]])
    pruner = mmprune.get("sms", keep=15)  # a cap the knee stays under
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
    for sample, h in zip(pruner.stats["samples"], hidden.double().numpy()):
        image = sample["images"][0]
        cos = h[1:] @ h[0] / (np.linalg.norm(h[1:], axis=1) * np.linalg.norm(h[0]))
        order = np.argsort(-cos, kind="stable")
        knee = chord_knee(cos[order].tolist())
        assert image["after"] == min(knee, 15) == len(image["kept"])
        assert image["kept"] == sorted(order[:image["after"]].tolist())
        assert f"after {knee} of 16 tokens" in image["note"]


def test_keep_all_is_the_identity_without_a_note():
    model = tiny_model("llava")
    pruner = mmprune.get("sms", keep=1.0)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch("llava", [[3, ("img", 0), 4]]))
    image = pruner.stats["samples"][0]["images"][0]
    assert image["after"] == image["before"] == 16 and "note" not in image


def test_keep_is_documented_as_an_upper_bound():
    cls = mmprune.METHODS["sms"]
    assert cls.keep_means.startswith("most visual tokens") and cls.variable_counts
    assert "not implemented" in cls.__doc__.lower()
