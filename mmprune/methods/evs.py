"""EVS: Efficient Video Sampling, vLLM's rule for dropping temporally redundant video tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Segment, Selection
from mmprune.methods.base import VideoPruner


@dataclass
class EVSPruner(VideoPruner):
    """Keep the video tokens that changed most since the previous temporal grid; the first grid stays whole.

    Paper: "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference"
    (arXiv 2510.14624, NVIDIA); reference code: vLLM's ``vllm/multimodal/evs.py`` (``compute_retention_mask``), used
    by its Qwen2.5-VL/Qwen3-VL models through ``--video-pruning-rate``.

    Rule (as vLLM's code), per video of ``T`` grids of ``H' x W'`` merged tokens, on the LLM-input embeddings
    ``e[t, h, w]``:
      1. dissimilarity ``d[t, h, w] = 1 - cos(e[t, h, w], e[t-1, h, w])`` for ``t >= 1``; ``d[0] = 255``, so the
         first grid is always kept;
      2. the ``count`` most dissimilar tokens stay (``argsort`` descending, stable: ties keep the earlier token),
         in their original ``(t, h, w)`` order, with their original M-RoPE ids;
      3. ``count = max(H'W', int(T H'W' keep))``: ``keep = 1 - video_pruning_rate``, floored as vLLM does (an int
         ``keep`` is a token count). vLLM never keeps less than one grid; neither does mmprune: a budget below
         one grid is raised to one grid, and the video's entry in ``stats`` says so (``note``).
    Tokens outside the grids (LLaVA-OneVision's trailing newline) are always kept and count in the budget (vLLM
    applies EVS to Qwen videos only, which have none).

    Images are left whole (EVS prunes videos only). Deliberate differences: the paper describes an RGB-space rule
    (L1 difference of pixel patches against a percentile threshold); vLLM's code, followed here, uses embedding
    cosine. vLLM's processor emits only the kept placeholders and renumbers the text after the video from
    ``start + W'``; here the prompt keeps the model's own position ids (those transformers computed for the full
    video), so the text after the video keeps its ids. Default ``keep=0.25`` (a pruning rate of 0.75; vLLM's
    switch has no default rate).
    """

    keep: int | float = 0.25

    name: ClassVar[str] = "evs"
    summary: ClassVar[str] = "videos: the tokens most changed since the previous frame, first frame whole (vLLM EVS)"
    keep_means: ClassVar[str] = "video tokens kept per video (images are not pruned)"

    def prune_video(self, tokens: MediaItem) -> Selection:
        grids, others = tokens.frame_indices(), tokens.other_indices()
        n = tokens.num_tokens
        count, note = self.video_count(n, grids.shape[1], others.numel())
        if count == n:
            return Selection.identity(n, device=tokens.embeds.device)
        flat = grids.reshape(-1)
        picked = retained(tokens.embeds[flat], grids.shape[0], count - others.numel())
        selection = Selection.of(torch.cat([flat[picked], others]))
        selection.note = note
        return selection

    def video_count(self, n: int, grid: int, others: int) -> tuple[int, str | None]:
        """Tokens kept of a video of ``n`` tokens (``grid`` per temporal grid, ``others`` outside the grids), and
        the note saying why when the budget was raised to one grid."""
        floor = grid + others  # the first grid, and the tokens outside the grids
        count = self.keep if isinstance(self.keep, int) else int(n * self.keep)
        if count > n:
            raise ValueError(f"keep={self.keep} asks for more tokens than the video has ({n}): expected an int in "
                             f"[1, {n}] or a float in (0, 1]")
        if count < floor:
            return floor, (f"keep={self.keep!r} asks for {count} of {n} tokens, less than one grid ({floor}); EVS "
                           f"keeps the first grid whole, so {floor} are kept")
        return count, None

    def output_count(self, num_tokens: int, segments: list[Segment], modality: str = "image") -> int:
        if modality != "video":
            return num_tokens
        frames = [s for s in segments if s.frame is not None]
        grid = frames[0].rows * frames[0].cols
        return self.video_count(num_tokens, grid, num_tokens - grid * len(frames))[0]


def retained(embeds: torch.Tensor, frames: int, count: int) -> torch.Tensor:
    """Indices (into the video's ``T * H'W'`` tokens) of the ``count`` tokens EVS keeps."""
    grids = embeds.float().reshape(frames, -1, embeds.shape[-1])
    similarity = F.cosine_similarity(grids[1:], grids[:-1], dim=-1)  # (T-1, H'W')
    dissimilarity = torch.cat([torch.full_like(grids[0, :, 0], 255.0).unsqueeze(0), 1.0 - similarity])
    order = torch.argsort(dissimilarity.reshape(-1), descending=True, stable=True)
    return order[:count]
