"""FoPru: keep the tokens (rank) or the grid rows (row) the vision encoder's attention marks as significant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Choice, param

STRATEGIES = ("rank", "row")


@dataclass
class FoPruPruner(PreLLMPruner):
    """Focal Pruning: token significance from the vision encoder's attention; keep the most significant tokens
    (``strategy="rank"``) or the most significant whole grid rows (``strategy="row"``), in original order.

    Paper: "FoPru: Focal Pruning for Efficient Large Vision-Language Models" (arXiv 2411.14164, 2024).
    The paper releases no code, and only its abstract could be read here. The one public implementation found is
    ``focal_prunning`` in dongxianzhe/hydrainfer (``hydrainfer/layer/token_prunning.py``, an inference engine; added
    on 30 Nov 2024, nine days after the paper, with its "rank" / "row" strategy names; not an official release), used
    on LLaVA-1.5 at the feature layer.

    That implementation, per image: take the feature layer's (``vision_feature_layer``, -2) attention over the 576
    patches ([CLS] row and column dropped), mean over heads; ``s1`` = mean over queries (the attention each patch
    *receives*), ``s2`` = mean over keys; the significance is whichever has the larger variance.
      * rank: the top-``k`` patches by significance (``torch.sort``, descending).
      * row: ``sqrt(N)`` rows of the square grid scored by the **sum** of their patches' significance; the top rows
        are kept whole. Its ``FocalPrunning`` module keeps ``floor(rows * ratio)`` rows; the function form passes
        the token count as the row count (broken for ``row``; only ``rank`` is wired into the engine).
      * Selected ids are sorted back to their original order (the paper's "token reordering").

    Here:
      * Significance = the head-mean attention each token receives at the feature layer (the column mean, ``s1``),
        the reading of the project's notes (the abstract says "attention-based token significance derived from the
        vision encoder"); the variance switch to the row mean ``s2`` is not reproduced (mmprune offers
        the column mean; on the patch block the row mean only measures how much each query attends to [CLS]), and
        probabilities are used (the implementation averages the pre-softmax logits it returns as "scores").
        Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision: ``token_attention`` is that column mean (Qwen: at the last vision
        block, averaged within each 2x2 merge unit; OneVision: at its feature layer). CLIP towers
        (LLaVA, LLaVA-NeXT): the adapter's ``received_attention`` ``(heads, N)``, the column mean over every query
        of the token's crop at the feature layer ([CLS]'s query included, where the implementation averages over
        the patch queries only).
      * row: rows are scored by the **mean** significance of their patches (the same ranking as the sum on one
        square grid; length-neutral across LLaVA-NeXT's base and high-res rows). Rows are taken whole in score
        order (ties to the earlier row) while they fit; the first row that does not fit gives its most
        significant patches to meet the budget exactly (the implementation keeps ``floor(rows * ratio)`` whole
        rows, i.e. fewer tokens than asked). Any grid works (rectangular, several segments: every segment's rows
        compete); a LLaVA-1.5 ``full``-strategy [CLS] is a one-token row.
      * Newline tokens (LLaVA-NeXT) carry no attention and are never kept, unless the budget exceeds the patches.
      * Ties go to the earlier token; batches of any size.
    """

    strategy: str = param("rank", Choice(options=STRATEGIES), "rank: global top-k tokens; row: whole grid rows")

    name: ClassVar[str] = "fopru"
    summary: ClassVar[str] = "top tokens or whole grid rows by received vision-encoder attention (FoPru)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        field = "received_attention" if tokens.has("received_attention") else "token_attention"
        scores = tokens.get(field).float().mean(dim=0)
        newline = torch.zeros(tokens.num_tokens, dtype=torch.bool, device=scores.device)
        for segment in tokens.segments:
            newline[segment.newline_indices().to(scores.device)] = True
        if self.strategy == "rank":
            order = torch.argsort(scores.masked_fill(newline, float("-inf")), descending=True, stable=True)
            return Selection.of(order[:k])
        rows = [segment.patch_indices()[r].to(scores.device) for segment in tokens.segments
                for r in range(segment.rows) if segment.cols > 0]
        return Selection.of(keep_rows(scores, rows, k, torch.nonzero(newline).reshape(-1)))


def keep_rows(scores: torch.Tensor, rows: list[torch.Tensor], k: int, rest: torch.Tensor) -> torch.Tensor:
    """``k`` token indices: whole ``rows`` by mean score, best first, while they fit; then the best tokens of the
    first row that does not fit; then ``rest`` in order if every row is taken."""
    means = torch.stack([scores[row].mean() for row in rows])
    kept, left = [], k
    for r in torch.argsort(means, descending=True, stable=True).tolist():
        row = rows[r]
        if row.numel() <= left:
            kept.append(row)
            left -= row.numel()
        else:
            kept.append(row[torch.argsort(scores[row], descending=True, stable=True)[:left]])
            left = 0
        if left == 0:
            break
    if left:
        kept.append(rest[:left])
    return torch.cat(kept)
