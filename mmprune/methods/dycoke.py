"""DyCoke: temporal token merging across the frames of a video, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Segment, Selection
from mmprune.methods.base import VideoPruner


@dataclass
class DyCokePruner(VideoPruner):
    """Keep, in most frames, only the tokens that changed since a reference frame (DyCoke's TTM stage).

    Paper: "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (CVPR 2025,
    arXiv 2411.15024); reference code KD-TAO/DyCoke, ``dycole_ttm`` in ``llava/model/llava_arch.py``.

    Rule (temporal token merging, TTM), per video of ``T`` frames of ``N`` tokens (here: temporal grids), on the
    LLM-input embeddings:
      1. odd frames: frame ``i + 1`` (``i`` even) keeps the ``k`` tokens least cosine-similar to the token at the
         same position in frame ``i``;
      2. frames ``i + 2`` with ``i = 0 mod 4`` and ``i < T - 4`` keep the ``k`` tokens least similar to frame
         ``i`` (the ``range(0, T - 4, 4)`` loop of the code, so the last group's third frame stays whole);
      3. frames ``0 mod 4`` (and any frame not named above) stay whole.
    ``k = int(keep * N)`` for a fraction (``keep = 1 - merging_ratio``, the paper's default 0.7 -> 0.3), or ``keep``
    tokens for an int: ``keep`` is the share kept in each pruned frame, not of the whole video.

    Images are left whole. Deliberate differences from the code: (a) step 1 compares each odd frame with the frame
    just before it, as the paper describes; the code reads ``similarities[(i - 2) // 2]``, the previous pair's
    similarities (the last pair's for ``i = 0``), an indexing slip LightCompress's port also corrects; (b) kept
    tokens stay in raster order (the code concatenates them from least to most similar) and ties go to the earlier
    token (the code's ``topk`` leaves them unspecified); (c) with an odd frame count the last frame is kept whole
    (the code's pairing loop drops it from the sequence); (d) a "frame" is a temporal grid on Qwen2-VL (two video
    frames, merged by the tower); LLaVA-OneVision's trailing newline is kept, as the reference (TTM runs on the
    pooled frames before the newline is appended); (e) the dynamic KV pruning during decoding (DyCoke's second stage) is not
    implemented.
    """

    keep: int | float = 0.3

    name: ClassVar[str] = "dycoke"
    summary: ClassVar[str] = "videos: frames keep only the tokens changed since a reference frame (DyCoke TTM)"
    keep_means: ClassVar[str] = "share (or count) of tokens kept in each pruned frame (1 - merging ratio)"

    def prune_video(self, tokens: MediaItem) -> Selection:
        grids, others = tokens.frame_indices(), tokens.other_indices()
        frames, per_frame = grids.shape
        count = self.frame_count(per_frame)
        if count == per_frame:
            return Selection.identity(tokens.num_tokens, device=tokens.embeds.device)
        flat = grids.reshape(-1)
        return Selection.of(torch.cat([flat[merged_frames(tokens.embeds[flat], frames, count)], others]))

    def frame_count(self, per_frame: int) -> int:
        """Tokens a pruned frame of ``per_frame`` keeps."""
        count = self.keep if isinstance(self.keep, int) else int(self.keep * per_frame)
        if count > per_frame:
            raise ValueError(f"dycoke: keep={self.keep} asks for more tokens than a frame has ({per_frame}): "
                             f"expected an int in [0, {per_frame}] or a float in (0, 1]")
        return count

    def output_count(self, num_tokens: int, segments: list[Segment], modality: str = "image") -> int:
        """Frames outside DyCoke's schedule stay whole; each scheduled frame keeps :meth:`frame_count`."""
        if modality != "video":
            return num_tokens
        frames = [s for s in segments if s.frame is not None]
        per_frame = frames[0].rows * frames[0].cols
        count = self.frame_count(per_frame)
        if count == per_frame:
            return num_tokens
        return num_tokens - len(pruned_frames(len(frames))) * (per_frame - count)


def pruned_frames(frames: int) -> dict[int, int]:
    """``{pruned frame: the frame it is compared with}`` under DyCoke's schedule."""
    pairs = {i + 1: i for i in range(0, frames - 1, 2)}
    pairs.update({i + 2: i for i in range(0, frames - 4, 4)})
    return pairs


def merged_frames(embeds: torch.Tensor, frames: int, count: int) -> torch.Tensor:
    """Indices (into the video's ``frames * N`` tokens) of the tokens DyCoke's TTM keeps."""
    grids = embeds.float().reshape(frames, -1, embeds.shape[-1])
    per_frame = grids.shape[1]
    reference = pruned_frames(frames)
    kept = []
    for t in range(frames):
        if t not in reference:
            kept.append(torch.arange(per_frame, device=embeds.device) + t * per_frame)
            continue
        similarity = F.cosine_similarity(grids[t], grids[reference[t]], dim=-1)
        least = torch.argsort(similarity, stable=True)[:count]
        kept.append(torch.sort(least).values + t * per_frame)
    return torch.cat(kept)
