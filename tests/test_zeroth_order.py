"""ZOO-Prune (``zeroth_order``): the zeroth-order sensitivity at the projector against closed forms, the
sensitivity-aware diversity selection against a plain loop, the whole rule on a hand-built image and on the tiny
LLaVA, Gemma 3, Idefics3 and SmolVLM, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import record_selects, tiny_model
from test_pre_llm import ONE_IMAGE

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods.zeroth_order import (
    ZerothOrderPruner,
    flat_spread,
    probe_directions,
    projector_sensitivity,
    sensitivity_diverse,
)


def loop_sensitivity(x: np.ndarray, project, directions: np.ndarray, h: float) -> np.ndarray:
    """Eq. 2-4 written out: for each token and each direction, the central difference's L2 norm; the mean over
    directions."""
    out = np.zeros(len(x))
    for i, row in enumerate(x):
        out[i] = np.mean([np.linalg.norm((project(row + h * u) - project(row - h * u)) / (2 * h))
                          for u in directions])
    return out


def loop_sads(z: np.ndarray, sensitivity: np.ndarray, k: int, flat: float = 0.0) -> list[int]:
    """Sensitivity-aware diversity selection written out: min-max normalised sensitivity (ones when its spread is
    at most ``flat`` of its largest value), first its argmax, then argmax s_i * (1 - max cos to the picked), lowest
    index on ties; picks in order."""
    s = sensitivity.astype(np.float64)
    s = (s - s.min()) / (s.max() - s.min()) if s.max() - s.min() > flat * abs(s.max()) else np.ones_like(s)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    picked = [int(np.argmax(s))]
    while len(picked) < k:
        best, best_score = None, -np.inf
        for i in range(len(z)):
            if i in picked:
                continue
            score = s[i] * (1 - max(float(zn[i] @ zn[j]) for j in picked))
            if score > best_score:
                best, best_score = i, score
        picked.append(best)
    return picked


def mlp(seed: int = 0, width: int = 6, out: int = 5):
    """A fixed two-layer tanh MLP standing in for the projector (numpy and torch versions)."""
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(width, 8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    w2 = torch.randn(8, out, generator=g, dtype=torch.float64)

    def torch_project(v: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(v.double() @ w1 + b1) @ w2).to(v.dtype)

    def numpy_project(v: np.ndarray) -> np.ndarray:
        return np.tanh(v @ w1.numpy() + b1.numpy()) @ w2.numpy()

    return torch_project, numpy_project


def test_directions_are_a_seeded_bank_of_unit_vectors():
    bank = probe_directions(0, 64, 1024)
    assert bank.shape == (64, 1024) and bank.dtype == torch.float32
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(64))
    assert torch.equal(bank, probe_directions(0, 64, 1024))
    assert not torch.allclose(bank, probe_directions(1, 64, 1024))


def test_sensitivity_of_a_quadratic_projector_is_the_closed_form_for_any_step():
    """M(x) = x * x (elementwise): the central difference is exactly 2 x * u, so S(i) = mean_j ||2 x_i * u_j||,
    whatever h (a forward difference would add h u * u)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    u = probe_directions(3, 16, 5).double()
    expected = (2 * x.unsqueeze(0) * u.unsqueeze(1)).norm(dim=-1).mean(dim=0)
    for h in (1e-3, 0.01, 0.5):
        torch.testing.assert_close(projector_sensitivity(x, lambda v: v * v, u, h), expected.float(),
                                   rtol=1e-5, atol=1e-6)
    assert len(set(expected.round(decimals=6).tolist())) == 7  # tokens do differ


def test_sensitivity_of_an_affine_projector_is_the_same_for_every_token():
    """M(x) = W x + b: S(i) = mean_j ||W u_j|| for every token (the Jacobian is W everywhere)."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64) * 10
    u = probe_directions(0, 32, 5).double()
    s = projector_sensitivity(x, lambda v: v @ w + b, u, 0.01)
    torch.testing.assert_close(s, (u @ w).norm(dim=-1).mean().float().expand(6), rtol=1e-5, atol=1e-6)


def test_sensitivity_matches_the_written_out_estimator_in_chunks(monkeypatch):
    """A nonlinear projector: the batched, chunked estimate equals the per-token, per-direction loop."""
    torch_project, numpy_project = mlp()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 6, generator=g, dtype=torch.float64)
    u = probe_directions(5, 10, 6)
    expected = loop_sensitivity(x.numpy(), numpy_project, u.double().numpy(), 0.01)
    monkeypatch.setattr("mmprune.methods.zeroth_order.PROBE_ELEMENTS", 11 * 12 * 3)  # chunks of 3 directions
    np.testing.assert_allclose(projector_sensitivity(x, torch_project, u, 0.01).numpy(), expected, rtol=1e-6)


def test_selection_is_sensitivity_times_diversity_picked_greedily():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(30, 8, generator=g)
    sensitivity = torch.rand(30, generator=g)
    for k in (1, 5, 12, 30):
        assert sensitivity_diverse(z, sensitivity, k).tolist() == loop_sads(z.numpy(), sensitivity.numpy(), k)


def test_a_near_duplicate_of_the_first_pick_waits_despite_its_sensitivity():
    """Token 0 is the most sensitive, token 1 its near-copy and second most sensitive: diversity sends the next
    pick elsewhere; the least sensitive token (normalised to 0) comes last."""
    z = torch.tensor([[1.0, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]])
    sensitivity = torch.tensor([5.0, 4.9, 3.0, 2.0, 1.0])
    order = sensitivity_diverse(z, sensitivity, 5).tolist()
    assert order == loop_sads(z.numpy(), sensitivity.numpy(), 5)
    assert order[0] == 0 and order[1] == 2 and order[-1] == 4


def test_constant_sensitivity_falls_back_to_diversity_from_token_zero():
    z = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [-1, 0.2]])
    assert sensitivity_diverse(z, torch.full((4,), 2.0), 3).tolist() == [0, 3, 2]
    assert loop_sads(z.numpy(), np.full(4, 2.0), 3) == [0, 3, 2]
    rounding = torch.tensor([2.0, 2.0, 2.0, 2.00001])  # a linear projector's float32 central differences
    assert sensitivity_diverse(z, rounding, 3, flat=flat_spread(torch.float32)).tolist() == [0, 3, 2]
    assert sensitivity_diverse(z, rounding, 3).tolist() == [3, 0, 1]  # with no tolerance, rounding would rank


def test_the_flat_spread_widens_for_coarse_formats():
    assert flat_spread(torch.float32) == flat_spread(torch.float64) == 1e-3
    assert flat_spread(torch.float16) == pytest.approx(10 * 2 ** -10)
    assert flat_spread(torch.bfloat16) == pytest.approx(10 * 2 ** -7)


def item(n_rows=4, n_cols=5, seed=0, newline=False):
    torch_project, numpy_project = mlp(seed)
    g = torch.Generator().manual_seed(seed + 10)
    n = n_rows * n_cols
    features = torch.randn(n, 6, generator=g)
    embeds = torch_project(features)
    if newline:  # a LLaVA-NeXT-like grid: each row ends with a newline token (no features: zeros)
        stride = n_cols + 1
        full_f, full_e = torch.zeros(n_rows * stride, 6), torch.full((n_rows * stride, 5), 0.3)
        patches = Segment(0, n_rows, n_cols, newline=True).patch_indices().reshape(-1)
        full_f[patches], full_e[patches] = features, embeds
        features, embeds, segments = full_f, full_e, [Segment(0, n_rows, n_cols, newline=True)]
    else:
        segments = [Segment(0, n_rows, n_cols)]
    tokens = MediaItem(embeds, segments, family="llava", lazy={"vision_features": lambda: features},
                       project=torch_project)
    return tokens, features, embeds, numpy_project


def test_whole_rule_on_a_hand_built_image_equals_the_independent_computation():
    tokens, features, embeds, numpy_project = item()
    pruner = mmprune.get("zeroth_order", keep=7)
    selection = pruner.prune_image(tokens)
    bank = probe_directions(pruner.seed, pruner.directions, 6).double().numpy()
    s = loop_sensitivity(features.double().numpy(), numpy_project, bank, pruner.step)
    expected = sorted(loop_sads(embeds.double().numpy(), s, 7))
    assert selection.slots.tolist() == expected and selection.embeds is None
    other = mmprune.get("zeroth_order", keep=7, directions=3, step=0.2, seed=9).prune_image(tokens)
    bank = probe_directions(9, 3, 6).double().numpy()
    s = loop_sensitivity(features.double().numpy(), numpy_project, bank, 0.2)
    assert other.slots.tolist() == sorted(loop_sads(embeds.double().numpy(), s, 7))


def test_the_same_image_keeps_the_same_tokens_wherever_it_sits():
    first, _, _, _ = item(seed=3)
    again, _, _, _ = item(seed=3)
    again.sample, again.index_in_sample = 2, 1
    pruner = mmprune.get("zeroth_order", keep=0.3)
    assert pruner.prune_image(first).slots.tolist() == pruner.prune_image(again).slots.tolist()


def test_newline_tokens_are_never_candidates():
    tokens, features, embeds, numpy_project = item(seed=1, newline=True)
    patches = Segment(0, 4, 5, newline=True).patch_indices().reshape(-1)
    selection = mmprune.get("zeroth_order", keep=6).prune_image(tokens)
    bank = probe_directions(0, 64, 6).double().numpy()
    s = loop_sensitivity(features[patches].double().numpy(), numpy_project, bank, 0.01)
    picks = loop_sads(embeds[patches].double().numpy(), s, 6)
    assert selection.slots.tolist() == sorted(patches[picks].tolist())
    everything = mmprune.get("zeroth_order", keep=23).prune_image(tokens)  # 24 tokens, 20 patches
    assert everything.slots.tolist() == patches.tolist() and "newline tokens are not candidates" in everything.note


def stock_projector(model, family: str):
    """The family's projector as the model's own modules apply it to pre-projector features (row-wise)."""
    inner = model.model
    if family == "gemma3":  # Gemma3MultiModalProjector after its pooling: soft-embedding norm, then the matrix
        projector = inner.multi_modal_projector
        return lambda x: projector.mm_soft_emb_norm(x) @ projector.mm_input_projection_weight
    if family in ("idefics3", "smolvlm"):  # the connector after its pixel shuffle
        return inner.connector.modality_projection
    return inner.multi_modal_projector


@pytest.mark.parametrize("family", ["llava", "gemma3", "idefics3", "smolvlm"])
def test_tiny_model_keeps_what_the_rule_gives_on_its_projector(monkeypatch, family):
    model = tiny_model(family)
    seen = record_selects(monkeypatch, ZerothOrderPruner)
    pruner = mmprune.get("zeroth_order", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(family, ONE_IMAGE))
    (tokens, k), = seen
    projector = stock_projector(model, family)
    features = tokens.get("vision_features")
    with torch.no_grad():
        torch.testing.assert_close(projector(features), tokens.embeds)  # the adapter's features are the input
        bank = probe_directions(0, 64, features.shape[-1]).double()
        x = features.double()
        s = np.array([np.mean([float(((projector((x[i] + 0.01 * u).float()) - projector((x[i] - 0.01 * u).float()))
                                      / 0.02).norm()) for u in bank]) for i in range(len(x))])
    expected = sorted(loop_sads(tokens.embeds.double().numpy(), s, k, flat=1e-3))
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected
    if family in ("idefics3", "smolvlm"):  # a linear projection: diversity alone, from token 0
        assert expected == sorted(loop_sads(tokens.embeds.double().numpy(), np.ones(len(x)), k))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_5", "llava_onevision"])
def test_families_without_pre_projector_features_are_refused_at_attach(family):
    model = tiny_model(family)
    with pytest.raises(ValueError, match="zeroth_order supports llava, llava-next, internvl, gemma3, idefics3 only"):
        mmprune.get("zeroth_order").attach(model)


def test_an_item_without_vision_features_is_refused_with_the_reason():
    tokens = MediaItem(torch.randn(16, 5), [Segment(0, 4, 4)], family="llava")
    with pytest.raises(ValueError, match="no pre-projector features"):
        mmprune.get("zeroth_order", keep=4).prune_image(tokens)


@pytest.mark.parametrize("field, value, allowed", [
    ("directions", 0, "an int >= 1"), ("directions", 2.0, "an int >= 1"), ("step", 0.0, r"a number in \(0, inf\]"),
    ("step", -0.01, r"a number in \(0"), ("seed", -1, "an int >= 0"),
])
def test_bad_fields_fail_at_get_naming_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"zeroth_order: {field}={value!r} is not valid: expected {allowed}"):
        mmprune.get("zeroth_order", **{field: value})
