"""HoloV: chunk count, the budget allocation (floor + leftovers, overflow redistributed), the within-chunk choice,
newline tokens, and the no-[CLS] path on Qwen2-VL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import record_selects, tiny_model

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods.holov import HoloVPruner, allocate, chunk_score


def item(attention, segments=None, seed=0, dim=8):
    """A hand-built image: one grid (or ``segments``), one attention head, random embeddings."""
    attention = torch.tensor(attention, dtype=torch.float32)
    n = attention.numel()
    embeds = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    segments = segments or [Segment(0, 1, n)]
    return MediaItem(embeds, segments, lazy={"token_attention": lambda: attention.unsqueeze(0)})


@pytest.mark.parametrize("n, k, chunks", [(576, 64, 16), (576, 128, 8), (576, 192, 5), (2880, 320, 16), (16, 4, 7),
                                          (16, 1, 28)])
def test_chunk_count_scales_the_codes_16_chunks_at_64_of_576_with_the_ratio(n, k, chunks):
    assert HoloVPruner().chunk_count(n, k) == chunks
    assert HoloVPruner(chunks=3).chunk_count(n, k) == 3


def test_allocation_is_the_floor_of_the_weights_plus_leftovers_to_the_largest():
    sizes = torch.tensor([10, 10, 10])
    assert allocate(torch.tensor([0.40, 0.35, 0.25]), sizes, 4).tolist() == [2, 1, 1]  # floor [1, 1, 1] + 1
    assert allocate(torch.tensor([0.25, 0.35, 0.40]), sizes, 4).tolist() == [1, 1, 2]
    assert allocate(torch.full((3,), 1 / 3), sizes, 5).tolist() == [2, 2, 1]  # ties: the lower chunk first


def test_overflow_is_allocated_again_over_the_chunks_with_room():
    # floor [3, 1, 1] + 1 to chunk 0 = [4, 1, 1]; chunk 0 holds 2, so its 2 extra go to chunks 1, 2 by 0.6 : 0.4
    # (floor [1, 0], the leftover to chunk 1). The reference keeps [2, 1, 1] and pads 2 zero tokens.
    assert allocate(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([2, 5, 5]), 6).tolist() == [2, 3, 1]
    # a cascade: chunk 0 overflows, then chunk 1 overflows in the second pass
    out = allocate(torch.tensor([0.7, 0.2, 0.06, 0.04]), torch.tensor([1, 3, 10, 10]), 10)
    assert out.tolist() == [1, 3, 5, 1]


def test_a_chunk_scores_its_mean_attention_up_to_the_variance_factor():
    """The variance term is rescaled to the chunk's attention scale: the chunk score is
    1000 mean(a) (1 + 0.09 f), f = mean(v) / (mean(v) + 1e-6); a one-token chunk scores its raw attention."""
    g = torch.Generator().manual_seed(1)
    a, x = torch.rand(6, generator=g) * 1e-2, torch.randn(6, 8, generator=g)
    xn = x / (x.norm(dim=1, keepdim=True) + 1e-6)
    s = (xn @ xn.T).fill_diagonal_(0)
    v = ((s - (s.sum(1) / 5)[:, None]) ** 2).sum(1) / 5  # the zeroed diagonal counts, as the code
    expected = 1000 * a.mean() * (1 + 0.09 * v.mean() / (v.mean() + 1e-6))
    torch.testing.assert_close(chunk_score(a, x), expected)
    assert chunk_score(a[:1], x[:1]) == a[0]


def test_select_redistributes_overflow_and_takes_each_chunks_top_by_attention():
    # chunks of 4: means 10, 1.25, 1.75 -> floor [4, 0, 0] + leftovers to chunks 0, 2 = [5, 0, 1]; chunk 0 holds 4,
    # its extra goes to chunk 2 (the larger weight with room): [4, 0, 2]; chunk 2 keeps 10 (3) then 9 (2)
    attention = [10, 10, 10, 10, 1, 1, 1, 2, 1, 2, 3, 1]
    tokens = item(attention)
    assert HoloVPruner(chunks=3).select(tokens, 6).slots.tolist() == [0, 1, 2, 3, 9, 10]
    assert HoloVPruner(chunks=3, reference_order=True).select(tokens, 6).slots.tolist() == [0, 1, 2, 3, 10, 9]


def test_select_gives_leftovers_to_the_largest_chunk_weights():
    # means 3, 2, 1 -> w = [1/2, 1/3, 1/6]; k = 5: floor [2, 1, 0], leftovers to chunks 0 and 1 -> [3, 2, 0];
    # chunk 0 top-3 of (2, 4, 3, 3): 1, 2, 3; chunk 1 top-2 of (2, 2, 1, 3): 7, then 4 (tie with 5: lower index)
    attention = [2, 4, 3, 3, 2, 2, 1, 3, 1, 1, 1, 1]
    assert HoloVPruner(chunks=3).select(item(attention), 5).slots.tolist() == [1, 2, 3, 4, 7]


def test_newline_tokens_are_left_out_of_the_chunks():
    """LLaVA-NeXT layout: a 2x2 base grid, then a 2x2 grid whose rows end with a newline (tokens 6 and 9). The
    chunks cover the 8 patches only; a budget beyond them takes newlines last."""
    segments = [Segment(0, 2, 2), Segment(4, 2, 2, newline=True)]
    attention = [1, 1, 1, 1, 1, 9, 0, 9, 1, 0]  # newlines' values are ignored
    tokens = item(attention, segments)
    # 8 patches in 2 chunks of 4: [0..3] (mean 1) and [4, 5, 7, 8] (mean 5) -> w = [1/6, 5/6], k = 3:
    # floor [0, 2], leftover to chunk 1 -> [0, 3]: 5, 7, then 4 (tie with 8: lower index)
    assert HoloVPruner(chunks=2).select(tokens, 3).slots.tolist() == [4, 5, 7]
    assert HoloVPruner().select(tokens, 9).slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_llava_next_never_keeps_newline_tokens():
    model = tiny_model("llava_next")
    pruner = mmprune.get("holov", keep=20)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch("llava_next", [[3, ("img", 0), 4]]))
    image = pruner.stats["samples"][0]["images"][0]
    newlines = {16 + 9 * row + 8 for row in range(8)}  # 16 base tokens, then 8 rows of 8 patches + a newline
    assert image["after"] == 20 and not newlines & set(image["kept"])


def reference_holov(a: np.ndarray, x: np.ndarray, k: int) -> list[int]:
    """The reference's HoloV in numpy for a budget that overflows no chunk (asserted)."""
    n = len(a)
    chunks = max(1, int(1024 / 576 * n / k))
    sizes = [n // chunks + int(c < n % chunks) for c in range(chunks)]
    bounds = np.cumsum([0] + sizes)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)
    scores = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        sim = x[s:e] @ x[s:e].T * (1 - np.eye(e - s))
        var = ((sim - (sim.sum(1) / (e - s - 1))[:, None]) ** 2).sum(1) / (e - s - 1)
        att = a[s:e] * 1e3
        scores.append((att + 0.09 * var * np.abs(att).mean() / (np.abs(var).mean() + 1e-6)).mean())
    w = np.array(scores) / (np.sum(scores) + 1e-6)
    alloc = np.floor(w * k).astype(int)
    alloc[np.argsort(-w, kind="stable")[: k - alloc.sum()]] += 1
    assert (alloc <= sizes).all()
    return sorted(int(s + i) for s, e, m in zip(bounds[:-1], bounds[1:], alloc)
                  for i in np.argsort(-a[s:e], kind="stable")[:m])


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_scores_by_received_attention_and_post_merger_embeddings(family_name, monkeypatch):
    """Without [CLS] the score is the adapter's received attention (head mean) and the similarity is on the
    embeddings entering the LLM, as the authors' Qwen2.5-VL port."""
    seen = record_selects(monkeypatch, HoloVPruner)
    model = tiny_model(family_name)
    pruner = mmprune.get("holov", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(family_name, [[3, ("img", 1), 4]]))
    (tokens, k), = seen
    assert tokens.num_tokens == 24 and k == 6
    a = tokens.token_attention.mean(0).double().numpy()
    expected = reference_holov(a, tokens.embeds.double().numpy(), k)
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected


def test_holov_refuses_a_bad_chunk_count():
    with pytest.raises(ValueError, match="chunks"):
        mmprune.get("holov", chunks=0)
