"""FoPru: the rank and row strategies on hand-built significance grids, and on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny
from mmprune.media import MediaItem, Segment

# significance of a 4 x 4 grid (one head): row means 1.5, 6.0, 1.0, 7.5 -> rows 3, 1, 0, 2
GRID = torch.tensor([[1.0, 2.0, 1.0, 2.0],
                     [9.0, 9.0, 3.0, 3.0],
                     [1.0, 1.0, 1.0, 1.0],
                     [0.0, 8.0, 8.0, 14.0]])


def item(scores: torch.Tensor, segments: list[Segment], field: str = "token_attention", **lazy) -> MediaItem:
    return MediaItem(torch.zeros(scores.numel(), 1), segments,
                     lazy={field: lambda: scores.reshape(1, -1), **lazy})


def kept(tokens: MediaItem, k: int, strategy: str) -> list[int]:
    return mmprune.get("fopru", keep=k, strategy=strategy).prune_image(tokens).kept()


def test_row_keeps_whole_rows_by_mean_significance():
    tokens = item(GRID, [Segment(0, 4, 4)])
    assert kept(tokens, 8, "row") == [4, 5, 6, 7, 12, 13, 14, 15]  # rows 3 and 1
    assert kept(tokens, 12, "row") == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]


def test_row_meets_a_budget_off_the_row_length_from_the_next_row():
    """k = 6: row 3 whole (4 tokens), then the 2 most significant tokens of the next row (row 1: 4 and 5), where
    the implementation would keep floor(6 / 4) = 1 row only."""
    assert kept(item(GRID, [Segment(0, 4, 4)]), 6, "row") == [4, 5, 12, 13, 14, 15]
    assert kept(item(GRID, [Segment(0, 4, 4)]), 3, "row") == [13, 14, 15]  # inside the best row


def test_rank_keeps_the_global_top_k_which_row_does_not():
    """rank takes the 4 highest tokens wherever they are (ties to the earlier token); row keeps row 3 whole."""
    tokens = item(GRID, [Segment(0, 4, 4)])
    assert kept(tokens, 4, "rank") == [4, 5, 13, 15]  # 14, 9, 9, 8 (13 and 14 tie at 8: the earlier)
    assert kept(tokens, 5, "rank") == [4, 5, 13, 14, 15]
    assert kept(tokens, 4, "row") == [12, 13, 14, 15]


def test_rows_of_every_segment_compete_by_mean_and_newlines_are_never_kept():
    """A LLaVA-NeXT-like layout: a 2 x 2 base grid, then a 2 x 4 grid whose rows end with a newline token. Row means
    base 5.0, 1.0; high-res 4.0, 6.0: the high-res row 1 (its 4 patches) and base row 0 fill k = 6."""
    base = torch.tensor([[5.0, 5.0], [1.0, 1.0]])
    high = torch.tensor([[4.0, 4.0, 4.0, 4.0, 0.0], [6.0, 6.0, 6.0, 6.0, 0.0]])  # last column: newline tokens
    scores = torch.cat([base.reshape(-1), high.reshape(-1)])
    tokens = item(scores, [Segment(0, 2, 2), Segment(4, 2, 4, newline=True)])
    assert kept(tokens, 6, "row") == [0, 1, 9, 10, 11, 12]
    assert kept(tokens, 6, "rank") == [0, 1, 9, 10, 11, 12]
    # more than the patches: the newlines come last, in order
    assert kept(tokens, 13, "row") == [i for i in range(14) if i != 13] and kept(tokens, 13, "rank") == kept(
        tokens, 13, "row")


def test_heads_are_averaged_and_received_attention_is_preferred():
    """Significance is the head mean; an adapter's received_attention (the column mean) wins over token_attention."""
    heads = torch.stack([GRID.reshape(-1), GRID.flip(0).reshape(-1) * 3])  # head 1 favours the top rows
    tokens = MediaItem(torch.zeros(16, 1), [Segment(0, 4, 4)], lazy={"token_attention": lambda: heads})
    assert kept(tokens, 4, "row") == [0, 1, 2, 3]  # means: row 0 = (1.5 + 3 * 7.5) / 2 is the highest
    received = item(GRID, [Segment(0, 4, 4)], field="received_attention", token_attention=lambda: heads)
    assert kept(received, 4, "row") == [12, 13, 14, 15]


def test_strategy_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"fopru: strategy='col' is not valid: expected one of 'rank', 'row'"):
        mmprune.get("fopru", strategy="col")


def test_llava_row_strategy_keeps_the_rows_the_eager_received_attention_ranks_first():
    """LLaVA-1.5 (4 x 4 grid), k = 6: rows by the attention each patch receives at the feature layer (mean over
    queries and heads), the best row whole and the next row's 2 best tokens."""
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4]])
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attn = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-2]
    scores = attn[0, :, :, 1:].mean((0, 1)).reshape(4, 4)
    first, second = scores.mean(1).argsort(descending=True)[:2].tolist()
    expected = [first * 4 + c for c in range(4)] + [second * 4 + c for c in scores[second].topk(2).indices.tolist()]
    pruner = mmprune.get("fopru", keep=6, strategy="row")
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    assert pruner.stats["samples"][0]["images"][0]["kept"] == sorted(expected)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_no_cls_families_use_the_received_attention_substitute(family):
    """rank = FasterVLM's top-k on the same field (the attention each token receives); row keeps whole rows of the
    merged grid."""
    model = tiny_model(family)
    inputs = tiny.batch(family, [[3, ("img", 0), 4]])
    kept_by = {}
    for name, params in (("fastervlm", {}), ("fopru", {}), ("fopru", {"strategy": "row"})):
        pruner = mmprune.get(name, keep=8, **params)
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
        kept_by[(name, *params.values())] = pruner.stats["samples"][0]["images"][0]["kept"]
    assert kept_by[("fopru",)] == kept_by[("fastervlm",)]
    row = kept_by[("fopru", "row")]
    assert len(row) == 8
    if family.startswith("qwen"):  # 4 x 4 merged grid: two whole rows
        rows = {i // 4 for i in row}
        assert len(rows) == 2 and row == sorted(r * 4 + c for r in rows for c in range(4))
