"""HoloV: spread the budget over contiguous chunks of the image by a holistic (attention + diversity) chunk score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.fastervlm import token_scores
from mmprune.methods.params import Bool, Int, param

EPS = 1e-6  # the reference's `esp`
BETA = 0.09  # the reference's weight of the variance term (`alpha` in the LLaVA code, `beta` in the Qwen port)


@dataclass
class HoloVPruner(PreLLMPruner):
    """Holistic budget allocation over contiguous chunks, then [CLS]-attention top-k within each chunk.

    Paper: "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention" (NeurIPS 2025)
    (arXiv 2510.02912); reference code obananas/HoloV (``llava/model/utils.py`` ``HoloV``, called from
    ``llava/model/llava_arch.py``; Qwen2.5-VL port ``qwen-model-HoloV/utils.py`` and ``modeling_qwen2_5_vl.py``).

    Rule (as the code), for ``N`` tokens and a budget ``k``:
      1. Cut the flattened token sequence into ``C`` contiguous 1-D chunks (not 2-D crops): ``N // C`` tokens each,
         the first ``N % C`` chunks one more; empty chunks are skipped. ``C = max(1, floor(16 N / (9 k)))`` is the
         Qwen port's ``int((1024 / 576) * N / k)``; it gives the LLaVA code's hard-coded 16 chunks of 36 at its
         hard-coded 64 of 576 tokens, and scales with the pruning ratio elsewhere (``chunks`` overrides it).
      2. Per chunk of ``n >= 2`` tokens, with ``a`` the head-mean [CLS] attention at the feature layer (layer -2)
         and ``S`` the cosine similarities of the chunk's projected tokens with the diagonal set to 0:
         ``m_i = sum_j S_ij / (n - 1)``, ``v_i = sum_j (S_ij - m_i)^2 / (n - 1)`` (the zeroed diagonal counts in the
         sum, as the code), ``score_i = 1000 a_i + beta * (mean|1000 a| / (mean|v| + 1e-6)) * v_i`` with
         ``beta = 0.09``; the chunk's score is the mean of ``score_i``. A one-token chunk scores its raw ``a``.
         (The rescaling makes the mean of the variance term ``beta * mean(1000 a) * f`` with
         ``f = mean|v| / (mean|v| + 1e-6)``, about 1 for any real tokens, so a chunk's score is about
         ``1000 (1 + beta) mean(a)`` and the weights below follow each chunk's mean attention; kept as the code.)
      3. ``w = score / (sum(score) + 1e-6)``, ``alloc = floor(w k)``; the ``k - sum(alloc)`` tokens left over go
         one each to the chunks of largest ``w`` (ties: lower chunk index, here by a stable sort).
      4. A chunk whose allocation reaches its size is kept whole; otherwise its top-``alloc`` tokens by ``a``
         alone (ties: lower index; the code's ``topk`` leaves them unspecified).
    Default budget 64 of 576 (the LLaVA code's ``new_image_token_num=64``), as a fraction (rounded, as every
    fraction here; the Qwen port floors ``N * prune_rate``).

    Deliberate differences:
      * Overflow is redistributed. The reference keeps a chunk whole when its allocation exceeds its size and
        zero-pads the output to ``k`` with the surplus (zero embeddings; position -1 on Qwen). Here the allocations
        are capped at the chunk sizes and the surplus is allocated again over the chunks that still have room, by
        the same rule (floor of the renormalised weights, leftovers to the largest weights), until ``k`` real
        tokens are allocated.
      * Order: the reference emits chunk after chunk, each chunk's tokens in descending attention (``torch.topk``
        order; a whole chunk stays in original order). Here the kept tokens are re-sorted to original order, as
        every pure selection in mmprune; ``reference_order=True`` emits the reference's order instead.
    Families:
      * LLaVA-1.5: the reference.
      * LLaVA-NeXT: the reference runs once over base + unpadded high-res tokens without newline tokens (its
        newline code is commented out), each patch scored by its own crop's [CLS]; the same here: newline tokens
        are left out of the chunks and not kept (unless ``k`` exceeds the other tokens, when the rest of the budget
        takes newlines in order). The chunk count follows the formula above instead of the code's fixed 16.
      * Qwen2-VL / Qwen2.5-VL (no [CLS]): the Qwen2.5-VL port scores with the attention each merged token receives
        at the last vision block (mean over queries and heads, averaged over the 2x2 merge unit), which is the
        adapter's ``token_attention``; the port averages it in window order without undoing Qwen2.5-VL's window
        permutation, which misaligns scores and tokens: here they are aligned. Similarity is on the post-merger
        embeddings (the LLM input), as the port.
      * LLaVA-OneVision (no code): the adapter's received attention at the feature layer and the LLM-input
        embeddings, as on Qwen; newline tokens as on LLaVA-NeXT.
    """

    keep: int | float = 64 / 576
    chunks: int | None = param(None, Int(1, optional=True),
                               "contiguous chunks of the token sequence (default max(1, 16N // 9k): 16 at 64 of 576)")
    reference_order: bool = param(False, Bool(),
                                  "emit the reference's order (chunk by chunk, descending attention) instead of "
                                  "original order")

    name: ClassVar[str] = "holov"
    summary: ClassVar[str] = "budget spread over contiguous chunks by attention + similarity variance (HoloV)"

    def chunk_count(self, n: int, k: int) -> int:
        return self.chunks if self.chunks is not None else max(1, (16 * n) // (9 * k))

    def select(self, tokens: MediaItem, k: int) -> Selection:
        scores = token_scores(tokens, reduce="mean")
        valid = torch.isfinite(scores).nonzero().squeeze(1)  # every token but LLaVA-NeXT's newlines
        n = valid.numel()
        take = min(k, n)
        picked = chunk_select(scores[valid], tokens.embeds[valid], take, self.chunk_count(n, take))
        slots = valid[picked]
        if take < k:  # only newline tokens are left to fill the budget
            slots = torch.cat([slots, (~torch.isfinite(scores)).nonzero().squeeze(1)[:k - take]])
        if self.reference_order:
            return Selection(slots=slots)
        return Selection.of(slots)


def chunk_score(attention: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The HoloV score of one chunk (a scalar): mean of ``1000 a + 0.09 * scale * var`` (raw ``a`` for one token)."""
    n = attention.numel()
    if n <= 1:
        return attention.mean()
    x = features / (features.norm(dim=1, keepdim=True) + EPS)
    s = (x @ x.T) * (1 - torch.eye(n, dtype=x.dtype, device=x.device))
    mean = s.sum(1) / (n - 1)
    var = ((s - mean[:, None]) ** 2).sum(1) / (n - 1)
    scaled = attention * 1e3
    scale = scaled.abs().mean() / (var.abs().mean() + EPS)
    return (scaled + BETA * var * scale).mean()


def allocate(weights: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens per chunk: ``floor(w k)`` plus one for each of the largest weights until ``k`` (HoloV's rule), then any
    allocation above a chunk's size re-allocated the same way over the chunks with room. Needs ``k <= sum(sizes)``."""
    alloc = torch.zeros_like(sizes)
    room = torch.ones_like(sizes, dtype=torch.bool)
    w = weights  # first pass: the reference's weights as given
    while True:
        short = k - int(alloc.sum())
        if short <= 0:
            return alloc
        if not room.all():  # later passes: the weights of the chunks with room, renormalised
            w = torch.where(room, weights, torch.zeros_like(weights))
            w = w / w.sum() if w.sum() > 0 else room.to(weights.dtype) / room.sum()
        add = torch.floor(w * short).long()
        left = short - int(add.sum())
        if left > 0:
            order = torch.argsort(w.masked_fill(~room, float("-inf")), descending=True, stable=True)
            add[order[:min(left, int(room.sum()))]] += 1
        alloc = torch.minimum(alloc + add, sizes)
        room = alloc < sizes


def chunk_select(attention: torch.Tensor, features: torch.Tensor, k: int, chunks: int) -> torch.Tensor:
    """HoloV over one token sequence: kept positions in the reference's order (chunk by chunk, each by descending
    attention; a chunk kept whole stays in order)."""
    n = attention.numel()
    attention, features = attention.float(), features.float()
    base, extra = divmod(n, chunks)
    sizes = torch.tensor([base + (1 if c < extra else 0) for c in range(chunks)], dtype=torch.long)
    sizes = sizes[sizes > 0]
    starts = torch.cumsum(sizes, 0) - sizes
    scores = torch.stack([chunk_score(attention[s:s + z], features[s:s + z])
                          for s, z in zip(starts.tolist(), sizes.tolist())])
    weights = (scores / (scores.sum() + EPS)).cpu()
    alloc = allocate(weights, sizes, k)
    kept = []
    for s, z, a in zip(starts.tolist(), sizes.tolist(), alloc.tolist()):
        if a >= z:
            kept.append(torch.arange(s, s + z, device=attention.device))
        elif a > 0:
            order = torch.argsort(attention[s:s + z], descending=True, stable=True)[:a]
            kept.append(s + order)
    return torch.cat(kept)
