"""HiPrune: the anchor / buffer / register split on hand-built attention grids, neighbour geometry at grid edges, the
object layer's scaling with the tower's depth, LLaVA-NeXT's packed grids and the no-[CLS] substitute."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods.hiprune import HiPrunePruner, object_layer

ONE_IMAGE = [[3, ("img", 0), 4]]


def grid_item(shallow: torch.Tensor, deep: torch.Tensor, segments: list[Segment], depth: int = 24,
              layer: int = 9, heads: int = 1) -> MediaItem:
    """An item whose per-layer received attention is ``shallow`` at 1-based ``layer`` (a flat -1 elsewhere, so
    another layer would pick other anchors) and whose feature-layer received attention is ``deep``."""
    n = shallow.numel()
    layers = torch.linspace(1.0, 0.0, n).expand(depth, heads, n).clone()  # other layers favour the first tokens
    layers[layer - 1] = shallow.reshape(1, n)
    return MediaItem(torch.zeros(n, 1), segments, lazy={
        "received_attention_by_layer": lambda: layers,
        "received_attention": lambda: deep.reshape(1, n).expand(heads, n),
    })


def kept(tokens: MediaItem, k: int, **params) -> list[int]:
    return HiPrunePruner(keep=k, **params).prune_image(tokens).kept()


# 5 x 5 grid: anchors 10 (row 2, left edge) and 2 (row 0, top edge); registers rank the later tokens first
SHALLOW = torch.zeros(25)
SHALLOW[10], SHALLOW[2] = 2.0, 1.0
DEEP = torch.arange(25, dtype=torch.float)


def test_anchors_buffers_and_registers_with_the_codes_flat_neighbours():
    """k = 12, alpha = 1: round(12 / 5) = 2 anchors (10, 2) at layer 9 of 24. Flat buffers: 10 -> 9 (wraps to the
    end of row 1), 11, 5, 15; 2 -> 1, 3, 0 (2 - 5 clamped to 0), 7: ten tokens, then the two best registers by the
    feature layer (24, 23)."""
    tokens = grid_item(SHALLOW, DEEP, [Segment(0, 5, 5)])
    assert kept(tokens, 12, alpha=1.0) == sorted([10, 2, 9, 11, 5, 15, 1, 3, 0, 7, 24, 23])


def test_grid_buffers_are_the_in_grid_4_neighbours():
    """buffer="grid": 10 has no left neighbour, 2 no upper one: 8 anchors and buffers, 4 registers."""
    tokens = grid_item(SHALLOW, DEEP, [Segment(0, 5, 5)])
    assert kept(tokens, 12, alpha=1.0, buffer="grid") == sorted([10, 2, 11, 5, 15, 1, 3, 7, 24, 23, 22, 21])


def test_corner_anchor_neighbours():
    """An anchor in the bottom-right corner (24): flat 23, 24 (clamped), 19, 24 (clamped); grid 23 and 19 only.
    k = 5, alpha = 1: one anchor; the flat list leaves 2 slots to registers (deep favours 0, 1, ...)."""
    shallow = torch.zeros(25)
    shallow[24] = 1.0
    tokens = grid_item(shallow, -DEEP, [Segment(0, 5, 5)])
    assert kept(tokens, 5, alpha=1.0) == [0, 1, 19, 23, 24]
    assert kept(tokens, 5, alpha=1.0, buffer="grid") == [0, 1, 19, 23, 24]
    shallow = torch.zeros(25)
    shallow[0] = 1.0  # top-left: flat 0, 1, 0, 5; grid 1, 5
    tokens = grid_item(shallow, DEEP, [Segment(0, 5, 5)])
    assert kept(tokens, 5, alpha=1.0) == [0, 1, 5, 23, 24] == kept(tokens, 5, alpha=1.0, buffer="grid")


def test_a_budget_below_anchors_and_buffers_keeps_the_first_k_of_them():
    """k = 4, alpha = 1: one anchor (12, the centre) and four buffers (11, 13, 7, 17): the first four are kept, left
    and right before up and down, where the code would ask topk for -1 registers."""
    shallow = torch.zeros(25)
    shallow[12] = 1.0
    assert kept(grid_item(shallow, DEEP, [Segment(0, 5, 5)]), 4, alpha=1.0) == [7, 11, 12, 13]


def test_an_over_budget_buffer_list_is_cut_direction_by_direction():
    """7 x 7 grid, k = 13, alpha = 1: round(2.6) = 3 anchors (24, 8, 40 by score) with 12 distinct buffers, one
    more than the 10 slots left: the list runs anchors, every anchor's left, right, upper, then lower neighbour (the
    code's concatenation order), so only the best anchor's lower neighbour (31) makes it."""
    shallow = torch.zeros(49)
    shallow[[24, 8, 40]] = torch.tensor([3.0, 2.0, 1.0])
    tokens = grid_item(shallow, torch.zeros(49), [Segment(0, 7, 7)])
    assert kept(tokens, 13, alpha=1.0) == sorted([24, 8, 40, 23, 7, 39, 25, 9, 41, 17, 1, 33, 31])


def test_anchor_count_rounds_like_python():
    """a = round(k alpha / 5) with Python's round, as the code: the default alpha = 0.1 gives round(12 * 0.1 / 5) = 0
    anchors (a pure register top-k); k = 20, alpha = 0.625 gives round(2.5) = 2 (banker's rounding), not 3."""
    tokens = grid_item(SHALLOW, DEEP, [Segment(0, 5, 5)])
    assert kept(tokens, 12) == list(range(13, 25))
    shallow = torch.zeros(25)
    shallow[[6, 18, 24]] = torch.tensor([3.0, 2.0, 1.0])  # a third anchor would be 24, the worst register
    selection = kept(grid_item(shallow, -DEEP, [Segment(0, 5, 5)]), 20, alpha=0.625)
    anchors_and_buffers = {6, 5, 7, 1, 11, 18, 17, 19, 13, 23}
    registers = [i for i in range(25) if i not in anchors_and_buffers][:10]
    assert selection == sorted(anchors_and_buffers | set(registers))
    assert 24 not in selection


def test_heads_are_averaged():
    """Two heads: head 0 puts all its mass on 2, head 1 spreads over 10 and 2 so that the mean favours 10."""
    layers = torch.zeros(24, 2, 25)
    layers[8, 0, 2] = 1.0
    layers[8, 1, 10], layers[8, 1, 2] = 0.9, -0.5  # means: 10 -> 0.45, 2 -> 0.25
    tokens = MediaItem(torch.zeros(25, 1), [Segment(0, 5, 5)], lazy={
        "received_attention_by_layer": lambda: layers, "received_attention": lambda: DEEP.reshape(1, 25)})
    assert kept(tokens, 5, alpha=1.0) == [5, 9, 10, 11, 15]  # anchor 10 with its flat buffers


@pytest.mark.parametrize(("depth", "expected"), [(24, 9), (3, 1), (26, 10), (27, 10), (32, 12), (12, 4), (1, 1)])
def test_object_layer_scales_with_the_towers_depth(depth, expected):
    """9 of CLIP-L's 24 layers, at the same relative depth elsewhere (at least layer 1)."""
    assert object_layer(None, depth) == expected
    assert object_layer(5, depth) == 5
    tokens = grid_item(SHALLOW, DEEP, [Segment(0, 5, 5)], depth=depth, layer=expected)
    assert kept(tokens, 12, alpha=1.0) == sorted([10, 2, 9, 11, 5, 15, 1, 3, 0, 7, 24, 23])


def test_an_explicit_object_layer_is_read_and_checked_against_the_tower():
    tokens = grid_item(SHALLOW, DEEP, [Segment(0, 5, 5)], depth=24, layer=3)
    assert kept(tokens, 12, alpha=1.0, object_layer=3) == sorted([10, 2, 9, 11, 5, 15, 1, 3, 0, 7, 24, 23])
    # the default layer 9 holds the linspace (tokens 0 and 1 first): other anchors
    assert kept(tokens, 12, alpha=1.0) != kept(tokens, 12, alpha=1.0, object_layer=3)
    with pytest.raises(ValueError, match=r"hiprune: object_layer=25 is beyond the 24-layer vision tower"):
        kept(tokens, 12, alpha=1.0, object_layer=25)


@pytest.mark.parametrize(("params", "message"), [
    ({"alpha": 1.5}, r"hiprune: alpha=1.5 is not valid: expected a number in \[0, 1\]"),
    ({"object_layer": 0}, r"hiprune: object_layer=0 is not valid: expected None or an int >= 1"),
    ({"buffer": "diag"}, r"hiprune: buffer='diag' is not valid: expected one of 'flat', 'grid'"),
])
def test_parameters_are_checked_at_construction(params, message):
    with pytest.raises(ValueError, match=message):
        mmprune.get("hiprune", **params)


def test_packed_grids_newlines_are_never_buffers_nor_kept():
    """A LLaVA-NeXT-like layout: 2 x 2 base grid (0..3), then a 2 x 3 grid whose rows end with a newline (4..11,
    newlines 7 and 11). Anchor 6 ends high-res row 0: flat right = 8 (next row's first patch, the newline skipped),
    up = 4 (the clamp), down = 10; grid: neither right nor up. Newlines (scored high here) are never buffers nor
    registers, and come last, in order, when k exceeds the patches."""
    shallow = torch.zeros(12)
    shallow[6] = 1.0
    deep = torch.tensor([5.0, 4.0, 3.0, 2.0, 0.0, 1.0, 0.0, 9.0, 0.0, 0.0, 0.0, 9.0])  # newlines score high
    segments = [Segment(0, 2, 2), Segment(4, 2, 3, newline=True)]
    tokens = grid_item(shallow, deep, segments)
    assert kept(tokens, 5, alpha=1.0) == [4, 5, 6, 8, 10]  # 6; left 5, right 8, up 4 (clamped), down 10
    assert kept(tokens, 5, alpha=1.0, buffer="grid") == [0, 1, 5, 6, 10]  # 6; left 5, down 10; registers 0, 1
    assert kept(tokens, 11, alpha=1.0) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # one newline (the first) fills


def eager_received(model, pixel_values) -> torch.Tensor:
    """(layers, crops, 1+N) eager attention each token receives (mean over heads and every query) per CLIP layer."""
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager.model.vision_tower(pixel_values, output_attentions=True).attentions
    return torch.stack([a.mean((1, 2)) for a in attentions])


class Recording(HiPrunePruner):
    """HiPrune that also records each image's per-layer field."""

    seen: list = []

    def select(self, tokens, k):
        Recording.seen.append(tokens.get("received_attention_by_layer").stack().mean(1))
        return super().select(tokens, k)


def flat_neighbours(p: int, rows: int, cols: int) -> list[int]:
    return [min(max(p + step, 0), rows * cols - 1) for step in (-1, 1, -cols, cols)]


def expected_kept(shallow: list[float], deep: list[float], grids: list[list[int]], cols: list[int], k: int,
                  alpha: float) -> list[int]:
    """The rule in plain Python: ``grids`` are each grid's token indices in raster order (``cols`` wide)."""
    patches = [t for grid in grids for t in grid]
    anchors = sorted(patches, key=lambda t: -shallow[t])[:round(k * alpha / 5)]
    where = {t: (g, p) for g, grid in enumerate(grids) for p, t in enumerate(grid)}
    buffers = [grids[where[a][0]][flat_neighbours(where[a][1], len(grids[where[a][0]]) // cols[where[a][0]],
                                                  cols[where[a][0]])[d]]
               for d in range(4) for a in anchors]
    order = anchors + buffers + sorted(patches, key=lambda t: -deep[t])
    return sorted(list(dict.fromkeys(order))[:k])


def test_llava_reads_every_layers_received_attention_and_the_object_layer():
    """Tiny LLaVA (3 layers, 4 x 4 grid): the field is the eager column mean of every layer; object_layer=3 (the last
    layer) with the feature layer's (attentions[-2]) registers, k = 8, alpha = 1: two anchors."""
    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    received = eager_received(model, inputs["pixel_values"])[:, 0, 1:]  # (3, 16)
    Recording.seen = []
    for layer in (None, 3):
        pruner = Recording(keep=8, alpha=1.0, object_layer=layer)
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
        shallow = received[0 if layer is None else layer - 1].tolist()
        expected = expected_kept(shallow, received[1].tolist(), [list(range(16))], [4], 8, 1.0)
        assert pruner.stats["samples"][0]["images"][0]["kept"] == expected
    torch.testing.assert_close(Recording.seen[0], received, rtol=1e-5, atol=1e-6)


def test_llava_next_scores_each_packed_token_by_its_own_crop_and_finds_neighbours_on_the_packed_grids():
    """The per-crop eager received attention of layer 1 (anchors) and of the feature layer (registers) packed with
    the model's own pack_image_features; a = round(22 / 5) = 4 anchors over the whole image (alpha = 1), flat
    neighbours on the base grid and on the unpadded high-res grid (its own width); newlines never kept."""
    model = tiny_model("llava_next")
    inputs = tiny.batch("llava_next", ONE_IMAGE)
    received = eager_received(model, inputs["pixel_values"][0])[:, :, 1:]  # (3 layers, crops, 16)
    packed = [model.model.pack_image_features([received[layer].unsqueeze(-1)], inputs["image_sizes"], "default",
                                              image_newline=torch.tensor([float("nan")]))[0][0][:, 0]
              for layer in range(3)]
    newline = torch.isnan(packed[0])
    base = list(range(16))
    rows = int(newline.sum())
    cols = (newline.numel() - 16) // rows - 1
    high = [16 + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
    assert not newline[base + high].any() and newline.sum() == rows
    k = 22
    expected = expected_kept(packed[0].tolist(), packed[1].tolist(), [base, high], [4, cols], k, 1.0)
    Recording.seen = []
    pruner = Recording(keep=k, alpha=1.0)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected
    field = Recording.seen[0]  # (layers, tokens): newline tokens zero
    torch.testing.assert_close(field, torch.stack(packed).nan_to_num(0.0), rtol=1e-5, atol=1e-6)


def kept_on(model, inputs, name: str, k: int, **params) -> list[int]:
    pruner = mmprune.get(name, keep=k, **params)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    return pruner.stats["samples"][0]["images"][0]["kept"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_ranks_anchors_and_registers_by_the_received_attention_substitute(family):
    """No per-layer field: anchors and registers both follow token_attention (the attention each merged token
    receives at the last vision block), the score FasterVLM ranks by there: its nested top-1, top-2, ... sets give
    the ranking. k = 10, alpha = 1: 2 anchors, flat neighbours on the 4 x 4 merged grid, then registers."""
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    n = tiny.tokens_per_image(family, 0)
    assert n == 16
    ranking, previous = [], set()
    for k in range(1, n):
        now = set(kept_on(model, inputs, "fastervlm", k))
        assert previous < now and len(now - previous) == 1  # nested: a ranking
        ranking += list(now - previous)
        previous = now
    ranking += sorted(set(range(n)) - previous)
    score = [0.0] * n
    for i, t in enumerate(ranking):
        score[t] = float(n - i)
    expected = expected_kept(score, score, [list(range(16))], [4], 10, 1.0)
    assert kept_on(model, inputs, "hiprune", 10, alpha=1.0) == expected
    assert expected != sorted(ranking[:10])  # the buffers matter here


def test_onevision_registers_are_the_received_attention_top_k():
    """LLaVA-OneVision (SigLIP, no [CLS]): with no anchors (the default alpha at a small k) HiPrune is FasterVLM's
    top-k on the family's received-attention substitute; with anchors it differs."""
    model = tiny_model("llava_onevision")
    inputs = tiny.batch("llava_onevision", ONE_IMAGE)
    assert kept_on(model, inputs, "hiprune", 12) == kept_on(model, inputs, "fastervlm", 12)
    assert kept_on(model, inputs, "hiprune", 12, alpha=1.0) != kept_on(model, inputs, "fastervlm", 12)


def test_only_the_object_layer_is_computed():
    """The per-layer table computes a layer when read: one full attention recomputation (the object layer), not
    one per encoder layer."""
    model = tiny_model("llava")
    session = mmprune.get("hiprune", keep=4, alpha=1.0).attach(model)
    with session, torch.no_grad():
        model(**tiny.batch("llava", [[3, ("img", 0), 4]]))
        assert sorted(session.adapter.captured["clip_received_layers"]) == [0]  # layer 1 of 3 (1-based), scaled
