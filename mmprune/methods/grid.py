"""Shared 2-D layout helpers for methods that think in patch grids (uniform sampling, pooling)."""

from __future__ import annotations

import math

import torch

from mmprune.media import Segment, MediaItem


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Split ``k`` tokens over parts of the given sizes, proportionally (largest remainder, ties to earlier parts)."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    shares = [min(int(math.floor(e)), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    left = k - sum(shares)
    for i in order:
        if left == 0:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
            left -= 1
    return shares


def per_segment_budget(tokens: MediaItem, k: int) -> list[tuple[Segment, int]]:
    """Each patch grid of the image with its proportional share of ``k`` (segments with no share left out)."""
    shares = split_budget(k, [s.rows * s.cols for s in tokens.segments])
    return [(segment, share) for segment, share in zip(tokens.segments, shares) if share > 0]


def frame_shares(frames: int, k: int) -> list[int]:
    """``k`` tokens over a video's ``frames`` temporal grids, evenly in time: every grid gets ``k // frames`` and
    the remainder goes to grids spread evenly over the video (not to the first ones); with ``k < frames``, ``k``
    evenly spaced grids get one token each."""
    shares = [k // frames] * frames
    for index in even_positions(frames, k % frames).tolist() if k % frames else []:
        shares[index] += 1
    return shares


def lattice_shape(rows: int, cols: int, k: int) -> tuple[int, int]:
    """The ``(r, c)`` lattice with ``r * c <= k`` tokens, ``r <= rows``, ``c <= cols``, that holds the most tokens;
    ties go to the shape whose aspect ratio is closest to the grid's."""
    best: tuple[int, float, int, int] | None = None
    target = math.log(rows / cols)
    for r in range(1, rows + 1):
        c = min(cols, k // r)
        if c < 1:
            break
        key = (r * c, -abs(math.log(r / c) - target), r, c)
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    return best[2], best[3]


def even_positions(n: int, count: int) -> torch.Tensor:
    """``count`` indices spread evenly over ``range(n)`` including both ends (``linspace`` rounded)."""
    if count == 1:
        return torch.tensor([(n - 1) // 2])
    return torch.linspace(0, n - 1, count).round().long()


def uniform_grid(segment: Segment, k: int) -> torch.Tensor:
    """Image-level indices of ``k`` patches spread evenly over the segment's 2-D grid.

    When some integer stride ``r`` gives exactly ``k`` tokens as ``grid[::r, ::r]`` (24x24 with r=3 -> 64), that
    stride grid is used, as in FEATHER and the catalog's uniform baseline. Otherwise a ``linspace`` lattice of at least
    ``k`` points is laid over the grid and ``k`` of them are taken at evenly spaced lattice ranks.
    """
    grid = segment.patch_indices()
    rows, cols = grid.shape
    for r in range(1, max(rows, cols) + 1):
        if math.ceil(rows / r) * math.ceil(cols / r) == k:
            return grid[::r, ::r].reshape(-1)
    r = max(1, min(rows, round(math.sqrt(k * rows / cols))))
    c = min(cols, math.ceil(k / r))
    while r * c < k:  # only when the rounded row count was too small for the column limit
        r += 1
        c = min(cols, math.ceil(k / r))
    lattice = grid[even_positions(rows, r)][:, even_positions(cols, c)].reshape(-1)
    return lattice[even_positions(lattice.numel(), k)]
