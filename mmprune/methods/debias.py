"""Attention debiasing for attention-scored in-LLM methods (``mmprune.get("fastv", debias=True)``)."""

from __future__ import annotations

import torch

SINK_FACTOR = 10.0  # a score above this many times the image's median is a sink, not evidence


def debias_scores(scores: torch.Tensor, positions: torch.Tensor, sink_factor: float = SINK_FACTOR,
                  degree: int = 2) -> torch.Tensor:
    """Remove the two biases that attention scores carry regardless of content.

    Paper: "Attention Debiasing for Token Pruning in Vision Language Models" (arXiv 2508.17807); reference code
    intcomp/attention-bias. It (1) zeroes the scores of pad-to-square padding patches and (2) multiplies the scores
    by the inverse of a positional attention trend fitted offline per method and benchmark (``.npy`` weights).

    Here, with no calibration data: (1) sinks — scores above ``sink_factor`` times the image's median are set to
    the median (HF processors crop or unpad, so LLaVA pad-to-square patches do not occur; what stays inflated are
    attention-sink tokens); (2) recency — a polynomial trend of ``log(score)`` over the tokens' sequence positions
    (``degree`` 2, least squares, fitted on this image's scores) is divided out, so a token near the query is no
    longer favoured for being near it. Returns scores of the same shape (only their order matters).
    """
    scores = scores.float()
    if scores.numel() <= degree + 1:
        return scores
    median = scores.median()
    clipped = torch.where(scores > sink_factor * median, median, scores)
    log = clipped.clamp_min(torch.finfo(torch.float32).tiny).log().double()
    x = positions.double()
    x = (x - x.mean()) / x.std().clamp_min(1e-12)
    design = torch.stack([x**p for p in range(degree + 1)], dim=1)
    coef = torch.linalg.lstsq(design, log.unsqueeze(1)).solution
    return (log - (design @ coef).squeeze(1)).exp().float()
