"""mmprune.viz: the greyed cells of a drawing are exactly the pruned tokens, for every family's layout."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from PIL import Image

import mmprune
import tiny
from mmprune.engine.session import final_kept
from mmprune.viz import TITLE_HEIGHT, cell_box, describe, draw_kept, grid_segments, kept_cells

# family, image id, expected grids (rows, cols) smallest first
LAYOUTS = [("llava", 0, [(4, 4)]), ("llava_next", 0, [(4, 4), (8, 8)]), ("qwen2_vl", 1, [(4, 6)]),
           ("qwen2_5_vl", 0, [(4, 4)])]


def pruned_stats(family: str, image_id: int, method: str = "random") -> dict:
    model = tiny_model(family)
    pruner = mmprune.get(method, keep=0.25, seed=1) if method == "random" else mmprune.get(method, keep=0.25)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(family, [[2, ("img", image_id), 3]]))
    return pruner.stats


@pytest.mark.parametrize(("family", "image_id", "grids"), LAYOUTS)
def test_greyed_cells_are_the_pruned_tokens(family, image_id, grids):
    stats = pruned_stats(family, image_id)
    assert [(s[1], s[2]) for s in grid_segments(stats, 0, 0)] == grids
    kept = final_kept(stats)[0][0]
    picture = Image.new("RGB", (120, 90), (255, 255, 255))
    for segment, (rows, cols) in enumerate(grids):
        start, _, _, newline = grid_segments(stats, 0, 0)[segment]
        stride = cols + int(bool(newline))
        expected = {divmod(i - start, stride) for i in kept
                    if 0 <= i - start < rows * stride and (i - start) % stride < cols}
        assert kept_cells(stats, 0, 0, segment)[2] == expected
        drawn = draw_kept(picture, stats, segment=segment)
        assert drawn.size == picture.size
        for row in range(rows):
            for col in range(cols):
                x0, y0, x1, y1 = cell_box(drawn.size, rows, cols, row, col)
                pixel = drawn.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
                assert (pixel == (255, 255, 255)) == ((row, col) in expected), (segment, row, col, pixel)


def test_llava_next_newline_tokens_are_not_cells():
    stats = pruned_stats("llava_next", 0, method="uniform")
    start, rows, cols, newline = grid_segments(stats, 0, 0)[-1]
    assert newline and cols == 8
    newlines = {start + r * (cols + 1) + cols for r in range(rows)}
    stats["samples"][0]["images"][0]["kept"] = sorted(newlines)  # only newline tokens kept: no cell survives
    assert kept_cells(stats)[2] == set()


def test_title_and_scale():
    stats = pruned_stats("llava", 0)
    title = describe(stats)
    assert title == "random keep=0.25: 4/16 tokens"
    drawn = draw_kept(Image.new("RGB", (32, 32), (255, 255, 255)), stats, title=title, scale=3)
    assert drawn.size == (96, 96 + TITLE_HEIGHT)


def test_a_missing_image_is_a_clear_error():
    stats = pruned_stats("llava", 0)
    with pytest.raises(ValueError, match="stats hold no image 2 of sample 0"):
        draw_kept(Image.new("RGB", (8, 8)), stats, image=2)


def test_video_frames_draw_their_own_temporal_grid():
    model = tiny_model("qwen2_vl")
    pruner = mmprune.get("uniform", keep=3)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch("qwen2_vl", [[2, ("vid", 1), 3]]))
    grids = grid_segments(pruner.stats, 0, 0, "video")
    assert [g[:3] for g in grids] == [[0, 4, 6], [24, 4, 6]]
    kept = final_kept(pruner.stats, "video")[0][0]
    frame = Image.new("RGB", (60, 40), (255, 255, 255))
    for t in range(2):
        expected = {divmod(i - 24 * t, 6) for i in kept if 24 * t <= i < 24 * (t + 1)}
        assert kept_cells(pruner.stats, 0, 0, t, "video")[2] == expected
        drawn = draw_kept(frame, pruner.stats, segment=t, modality="video")
        white = set()
        for r in range(4):
            for c in range(6):
                x0, y0, x1, y1 = cell_box(drawn.size, 4, 6, r, c)
                if drawn.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == (255, 255, 255):
                    white.add((r, c))
        assert white == expected
    assert describe(pruner.stats, modality="video") == "uniform keep=3: 3/48 tokens"
