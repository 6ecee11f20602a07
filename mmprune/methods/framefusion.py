"""FrameFusion: merge each video token into the same position of the previous frame while they are alike, then
prune the rest by attention, in the first layers of the LLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import HybridPruner
from mmprune.methods.params import Float, Int, param

# Similarity given to tokens with no earlier token at their position (the first frame, tokens outside the frames):
# below any threshold, so they are never merged away (the reference's value).
NO_PREDECESSOR = -2.0


@dataclass
class MergeState:
    """One video's progress through FrameFusion during a prefill."""

    cost: float
    patch: torch.Tensor  # (N,) each original token's patch position in its frame, -1 outside the frames
    sparsities: list[float] = field(default_factory=list)  # the share merged at each merging step (S_i)
    merging: bool = True
    done: bool = False  # merging met the budget alone, or the single pruning step ran
    pruned_at: int | None = None
    pruning_ratio: float | None = None


def pruning_ratio(sparsities: list[float], cost: float, num_layers: int) -> float:
    """The share of the remaining video tokens to remove so that the video tokens averaged over all layers meet
    ``cost``, after the merging steps that removed ``sparsities`` (one step counts as one layer; the remaining
    ``L - m`` layers run at the pruned density): ``1 - x``, ``x = (L cost - T) / ((L - m) s_m)`` clamped to
    [0, 1], with ``s_j`` the density after step ``j`` and ``T = sum_j s_j``: 0 when merging alone is within the
    budget, 1 when the merging steps have already spent it."""
    density, spent = 1.0, 0.0
    for share in sparsities:
        density *= 1.0 - share
        spent += density
    left = num_layers * cost - spent
    layers = num_layers - len(sparsities)
    if layers <= 0 or density == 0:
        return 0.0
    x = left / (layers * density)
    return 1.0 - min(max(x, 0.0), 1.0)  # x < 0: the merging steps already spent the budget (see the class)


def predecessor_similarity(hidden: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """``(n,)`` cosine similarity of each token to the previous token (in sequence order) at the same patch
    position; ``NO_PREDECESSOR`` for the first token of a position and for tokens outside the frames
    (``patch < 0``)."""
    n = patch.numel()
    similarity = torch.full((n,), NO_PREDECESSOR, dtype=torch.float32, device=hidden.device)
    inside = torch.nonzero(patch >= 0).reshape(-1)
    if inside.numel() < 2:
        return similarity
    order = inside[torch.argsort(patch[inside] * n + inside)]  # by position, then sequence order
    same = patch[order[1:]] == patch[order[:-1]]
    later, earlier = order[1:][same], order[:-1][same]
    similarity[later] = F.cosine_similarity(hidden[later].float(), hidden[earlier].float(), dim=-1)
    return similarity


def merge_runs(hidden: torch.Tensor, patch: torch.Tensor, flagged: torch.Tensor) -> Selection:
    """Fold every flagged token into the nearest earlier unflagged token at its patch position (the start of its
    run): that token becomes the plain mean of itself and the run (earlier merges are not weighted), keeps its
    slot, and the flagged tokens leave."""
    n = patch.numel()
    inside = torch.nonzero(patch >= 0).reshape(-1)
    order = inside[torch.argsort(patch[inside] * n + inside)]
    steps = torch.arange(order.numel(), device=hidden.device)
    anchor_step = torch.cummax(torch.where(flagged[order], -1, steps), dim=0).values
    anchors = order[anchor_step]  # per position in `order`, the token its run merges into
    members = flagged[order]
    sums = hidden.float().clone()
    sums.index_add_(0, anchors[members], hidden[order[members]].float())
    counts = torch.ones(n, device=hidden.device)
    counts.index_add_(0, anchors[members], torch.ones(int(members.sum()), device=hidden.device))
    kept = torch.nonzero(~flagged).reshape(-1)
    merged = (sums / counts.unsqueeze(-1))[kept].to(hidden.dtype)
    return Selection(slots=kept, embeds=merged, merged=int((counts[kept] > 1).sum()))


@dataclass
class FrameFusionPruner(HybridPruner):
    """Merge video tokens that match the same position in an earlier frame, layer after layer, until few are left
    to merge; then prune the rest once, by attention, to meet a compute budget.

    Paper: "FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large Visual Language
    Models" (ICCV 2025, arXiv 2501.01986); reference code thu-nics/FrameFusion (``framefusion/main.py``).

    Rule (as the code), per video:
      1. **Merging steps.** Each token's similarity is the cosine between its hidden state and that of the previous
         remaining token at the same patch position (the first frame and tokens outside the frames have none).
         ``upper`` is the pruning ratio the budget would need from here on (below). With ``r`` = the share of
         current video tokens whose similarity is at least ``similarity_lower_bound``: if ``r < upper`` they are
         all merged and ``r`` is recorded, and merging stops once ``r < ratio_lower_bound``; otherwise only the
         ``int(upper N)`` most similar are merged and the video is done (merging alone meets the budget; no
         pruning). A merged token folds into the earliest token of its run at that position, the unweighted mean
         of the run, in that token's slot and position.
      2. **Pruning**, once, at the layer after merging stopped: the attention the last prompt token gives (the
         last 4 prompt tokens on Qwen2-VL / Qwen2.5-VL, as the code; ``queries`` overrides), averaged over heads
         and queries, at the layer before; the top ``round(n (1 - p))`` video tokens stay, in order, with their
         original positions; ``p`` = ``1 - (L cost - T) / ((L - m) s_m)`` (see :func:`pruning_ratio`).
    The budget ``keep`` is the reference's ``cost``: the share of video tokens averaged over the LLM's layers (an
    int: that average as a token count of each video). Defaults: cost 0.3, similarity bound 0.6 (the value the
    code's examples use for LLaVA-Video; 0.5 for Qwen2-VL, 0.7 for MiniCPM-V), ratio bound 0.1.

    Deliberate differences: (a) the first merging step runs on the LLM-input embeddings, as the reference's
    layer-0 call, but every later step and the pruning run between decoder layers (at the input of layer ``l``)
    where the reference runs them between a layer's attention and its MLP (of layer ``l - 1``): the hidden states
    compared include layer ``l - 1``'s MLP, and that MLP still runs on the tokens that leave; (b) the cost model
    uses the model's own depth, where the code assumes 28 layers; (c) batches of any size and every video of a
    prompt, each with its own merging state (the code asserts one sample with one video); (d) when the merging
    steps have already spent the budget (``L cost < T``, rare at 28 layers, common in shallow models) the code
    raises "cost is too small" mid-forward; here the ratio is clamped to 1, so the next merging step may merge
    every alike token and the pruning step removes every remaining video token; (e) when only the ``int(upper N)`` most
    similar tokens merge, tokens with no predecessor are never among them (the code's top-k could pick one if
    fewer tokens had a predecessor); (f) LLaVA-OneVision's trailing newline has no patch position and is never
    merged (the code's LLaVA-Video layout gives each row's newline one), but it is a pruning candidate as in the
    code. Images pass through whole.
    """

    keep: int | float = 0.3
    similarity_lower_bound: float = param(0.6, Float(-1, 1, low_open=True),
                                          "cosine at or above which a token merges into its predecessor")
    ratio_lower_bound: float = param(0.1, Float(0, 1), "merging stops after a step that merged less than this share")
    queries: int | None = param(None, Int(1, optional=True),
                                "last prompt tokens whose attention scores the pruning (None: 4 on Qwen2-VL, else 1)")

    name: ClassVar[str] = "framefusion"
    summary: ClassVar[str] = "videos: merge tokens alike across frames, then prune by attention (FrameFusion)"
    keep_means: ClassVar[str] = ("equivalent average share (or count) of each video's tokens per layer "
                                 "(FrameFusion's cost)")
    modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    passes_through: ClassVar[tuple[str, ...]] = ("image",)
    default_positions: ClassVar[str | None] = "original"
    variable_counts: ClassVar[bool] = True
    attention_scored: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._states: dict[tuple, MergeState] = {}

    def cost(self, num_tokens: int) -> float:
        return self.keep / num_tokens if isinstance(self.keep, int) else float(self.keep)

    # ------------------------------------------------------------------ the first merging step (LLM input)
    def prune_image(self, tokens: MediaItem) -> Selection:
        if tokens.modality != "video":
            return Selection.identity(tokens.num_tokens, device=tokens.embeds.device)
        if isinstance(self.keep, int) and self.keep > tokens.num_tokens:
            raise ValueError(f"framefusion: keep={self.keep} asks for more tokens than the video has "
                             f"({tokens.num_tokens}): expected an int in [1, {tokens.num_tokens}] or a float in (0, 1]")
        state = MergeState(cost=self.cost(tokens.num_tokens),
                           patch=patch_positions(tokens.segments, tokens.embeds.device))
        self._states[(tokens.sample, tokens.index_in_sample)] = state
        return self._merge_step(state, tokens.embeds, state.patch)

    def _merge_step(self, state: MergeState, hidden: torch.Tensor, patch: torch.Tensor) -> Selection:
        n = patch.numel()
        upper = pruning_ratio(state.sparsities, state.cost, self._num_layers)
        similarity = predecessor_similarity(hidden, patch)
        video = int((patch >= 0).sum())
        alike = similarity >= self.similarity_lower_bound
        share = int(alike.sum()) / max(video, 1)
        if share < upper:
            state.sparsities.append(share)
            state.merging = share >= self.ratio_lower_bound
            flagged = alike
        else:  # merging alone meets the budget
            comparable = int((similarity > NO_PREDECESSOR).sum())
            count = min(int(upper * video), comparable)
            flagged = torch.zeros(n, dtype=torch.bool, device=hidden.device)
            flagged[torch.topk(similarity, count).indices] = True
            state.merging, state.done = False, True
        if not bool(flagged.any()):
            return Selection.identity(n, device=hidden.device)
        return merge_runs(hidden, patch, flagged)

    # ------------------------------------------------------------------ later steps, inside the LLM
    def plan(self, images: list, num_layers: int) -> tuple[list[int], list[list[int]]]:
        current = {(image.sample, image.index_in_sample) for image in images if image.modality == "video"}
        self._states = {key: state for key, state in self._states.items() if key in current}  # this prefill's
        layers = list(range(1, num_layers))
        return layers, [[image.count] * len(layers) for image in images]

    def check_model(self, num_layers: int) -> None:
        self._num_layers = num_layers

    def pre_llm_budget(self, num_tokens: int, modality: str = "image") -> int:
        return num_tokens  # an upper bound: how many merge is decided by the data

    def watch(self, num_layers: int, stage_layers: list[int]) -> set[int]:
        return set(range(num_layers - 1))  # pruning reads the layer before the one merging stopped at

    def describe_schedule(self) -> dict:
        videos = [{"sample": key[0], "video": key[1], "merged_shares": [round(s, 6) for s in state.sparsities],
                   "pruned_at_layer": state.pruned_at, "pruning_ratio": state.pruning_ratio}
                  for key, state in sorted(self._states.items())]
        return {"keep": self.keep, "mode": "merge while alike, then prune once (FrameFusion)", "videos": videos}

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        device = ctx.hidden.device
        out: list[Selection] = []
        scores = None
        for track in ctx.tracks:
            state = self._states.get((track.sample, track.index_in_sample)) if track.modality == "video" else None
            if state is None or state.done:
                out.append(Selection.identity(track.count, device=device))
            elif state.merging:
                patch = state.patch[track.original.to(state.patch.device)].to(device)
                out.append(self._merge_step(state, ctx.hidden[track.sample, track.positions], patch))
            else:
                if scores is None:
                    scores = self._attention_scores(ctx)
                state.pruning_ratio = pruning_ratio(state.sparsities, state.cost, self._num_layers)
                state.pruned_at, state.done = ctx.layer, True
                k = round(track.count * (1.0 - state.pruning_ratio))
                values = scores[track.sample, track.positions]
                out.append(Selection.of(torch.topk(values, k).indices) if k < track.count
                           else Selection.identity(track.count, device=device))
        ctx.forget_before(ctx.layer)
        return out

    def _attention_scores(self, ctx) -> torch.Tensor:
        """``(B, L)``: attention from the last ``queries`` prompt tokens at the previous layer, mean over heads and
        queries."""
        count = self.queries or (4 if ctx.runner.adapter.family == "qwen2-vl" else 1)
        last = ctx.last_token()
        rows = (last.unsqueeze(1) - torch.arange(count - 1, -1, -1, device=last.device)).clamp(min=0)
        return ctx.attention(ctx.layer - 1, rows).mean(dim=(1, 2))


def patch_positions(segments: list, device: torch.device) -> torch.Tensor:
    """``(N,)`` each token's patch position within its frame (raster index), ``-1`` outside the frames."""
    total = sum(s.size for s in segments)
    patch = torch.full((total,), -1, dtype=torch.long)
    for segment in segments:
        if segment.frame is not None:
            indices = segment.patch_indices().reshape(-1)
            patch[indices] = torch.arange(indices.numel())
    return patch.to(device)
