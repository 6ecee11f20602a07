"""SEATS: stage-adaptive token selection for omni-modal LLMs (audio and video), before, inside and late in the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import HybridPruner
from mmprune.methods.params import Bool, Float, Int, Layers, param

PAPER_DEPTH = 28  # Qwen2.5-Omni-7B, the depth of the reference's default schedule
PAPER_LAYERS = (16, 18, 20)  # tokens leave before these 0-indexed layers
PAPER_LATE = 23  # every audio and video token leaves before this one
# the reference's own configs: {depth: (drop layers, late layer)} (seats/config.yaml, config_qwen3_30b.yaml)
REFERENCE_SCHEDULES = {28: ([16, 18, 20], 23), 48: ([27, 31, 35], 39)}
AUDIO_TOKENS_PER_SECOND = 25


def keep_ratios(encoder_ratio: float, target: float, drops: list[int], late: int, num_layers: int) -> list[float]:
    """The keep ratio of each in-LLM drop so that the retention averaged over the ``num_layers`` layers equals
    ``target``: ``encoder_ratio`` enters the LLM, the drop amounts grow as ``e^0, e^1, e^2, ...`` (normalised) of a
    total drop fraction found by 50 bisection steps, and nothing is left from layer ``late`` on. Rounded to 4
    decimals, as the reference (``block_wise_ratio_decay_schedule``)."""
    drops = [d for d in drops if d < late]
    if not drops:
        return []
    bounds = [0, *drops, late]
    segments = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    weights = [math.exp(i) for i in range(len(drops))]
    shares = [w / sum(weights) for w in weights]

    def average(fraction: float) -> float:
        remaining = encoder_ratio
        total = segments[0] * remaining
        for i, share in enumerate(shares):
            remaining = max(remaining - fraction * encoder_ratio * share, 0.0)
            total += segments[i + 1] * remaining
        return total

    wanted = target * num_layers
    if wanted >= average(0.0):
        fraction = 0.0
    elif wanted <= average(1.0):
        fraction = 1.0
    else:
        low, high = 0.0, 1.0
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if average(mid) > wanted else (low, mid)
        fraction = (low + high) / 2
    levels, remaining = [encoder_ratio], encoder_ratio
    for share in shares:
        remaining = max(remaining - fraction * encoder_ratio * share, 1e-12)
        levels.append(remaining)
    return [round(b / a, 4) if a > 1e-12 else 0.0 for a, b in zip(levels[:-1], levels[1:])]


def diverse_subset(features: torch.Tensor, attention: torch.Tensor, count: int) -> torch.Tensor:
    """winDivPrune on one window: distances ``(1 - cos(e_i, e_j)) * a_j * 1e6``; the first pick is the token whose
    second-smallest distance in its column is largest, then repeatedly the token farthest (max over the minimum
    distance to the picks); sorted indices."""
    n = features.shape[0]
    if count >= n:
        return torch.arange(n, device=features.device)
    normed = features.float() / (features.float().norm(dim=-1, keepdim=True) + 1e-8)
    distance = (1.0 - normed @ normed.T) * (attention.float() * 1e6).unsqueeze(0)
    picks = [int(torch.argmax(torch.topk(distance, k=2, dim=0, largest=False).values[1]))]
    nearest = distance[picks[0]].clone()
    nearest[picks[0]] = -1.0
    for _ in range(1, count):
        pick = int(torch.argmax(nearest))
        picks.append(pick)
        nearest = torch.minimum(nearest, distance[pick])
        nearest[picks] = -1.0
    return torch.sort(torch.tensor(picks, device=features.device)).values


@dataclass
class SeatsPruner(HybridPruner):
    """Keep a diverse, attended subset of each audio/video window before the LLM, drop more inside it by the
    query's attention with a budget split between time windows and modalities, and remove every audio and video
    token at a late layer.

    Paper: "Stage-adaptive Token Selection for Efficient Omni-modal LLMs" (SEATS, arXiv 2605.20035); reference code
    xxayt/SEATS (``seats/pre_llm_units.py``, ``inner_llm_units.py``, ``ratio_decay_scheduler.py``).

    Budget: ``keep`` (video) and ``keep_audio`` are the **retention averaged over the LLM's layers** per modality
    (R_v, R_a; an int: that average as a token count of each item). Defaults (0.06, 0.35): the paper's "10%"
    point; its other settings are (0.10, 0.45), (0.20, 0.55) and (0.30, 0.65).

    Rule (as the code):
      1. **Before the LLM** (winDivPrune), per item: ``encoder_ratio_scale * R`` of each window's tokens stay
         (``max(1, min(n, round(r n)))``); windows are ``grid_in_window`` temporal grids of a video and
         ``audio_window_seconds`` of audio (50 tokens). Within a window, greedy max-min diversity on the LLM-input
         embeddings with distances weighted by each token's encoder attention (the video tower's last block, the
         audio tower's last layer: the attention a token receives, mean over heads).
      2. **Inside the LLM**, before layers 16, 18, 20 of 28 (27, 31, 35 of 48: the reference's Qwen3-Omni config;
         other depths scale the 28-layer schedule; ``layers`` overrides): each
         modality keeps the ratio the schedule solver gives (drop amounts growing as ``e^i``; with the pre-LLM level
         at 1.4 R the ratios are 0.9298, 0.7949, 0.2986 for 28 layers whatever R). The score is the last prompt
         token's attention (mean over heads) computed with the *previous* layer's norm, q/k projections and RoPE on
         the current hidden states. The i-th run of video tokens and the i-th run of audio tokens form a time window
         (the processor's 2-second chunks); with several windows and both modalities, each window's budget is
         ``round((softmax(v/0.1) + softmax(a/0.1)) / 2 * (K_v + K_a))`` (v, a: its mean scores; clamped to
         [1, size], repaired to the exact total) and split between its video and audio by demand, each present
         modality keeping one; then the top-scored tokens of each window and modality stay. One window or one
         modality: a global top-k per modality.
      3. **Late**: before layer 23 of 28 (39 of 48; ``late_layer``), every audio and video token leaves.
    ``shrink_earlier_caches=True`` (the reference) also removes the dropped tokens from the KV cache of every earlier
    layer, so decoding attends to the final kept tokens only (after the late layer: text only); ``False`` keeps
    mmprune's per-layer cache (each layer keeps the tokens that entered it: more memory, the prefill's own view).

    Images pass through whole (the reference counts them as text). Items without an encoder attention statistic
    (LLaVA-NeXT-Video and LLaVA-OneVision videos, pooled from several patches) are chosen by diversity alone, the
    code's unweighted mode. Deliberate differences: (a) the video attention
    statistic is the attention each token receives within its own temporal grid (the span the tower attends
    within), where the reference recomputes it over 2-grid chunks; (b) windows and the pre-LLM selection are per
    item (the reference concatenates a prompt's videos); (c) batches of any size, each sample with its own windows
    and budgets (the reference asserts batch 1); (d) ties in the top-k go to the earlier token (stable sort); (e)
    a modality whose budget is 1.0 is left whole at every stage, the late removal included (mmprune's contract that
    ``keep=1.0`` removes nothing; the reference would still remove it late); (f) the "last text token" is the last prompt token.
    """

    keep: int | float = 0.06
    keep_audio: int | float | None = 0.35
    encoder_ratio_scale: float = param(1.4, Float(1, 10), "pre-LLM retention as a multiple of the target R")
    grid_in_window: int = param(2, Int(1), "temporal grids per pre-LLM video window")
    audio_window_seconds: float = param(2.0, Float(0, 3600, low_open=True), "seconds per pre-LLM audio window")
    layers: list[int] | None = param(None, Layers(optional=True),
                                     "in-LLM drop layers (default: 16, 18, 20 of 28, scaled to the model's depth)")
    late_layer: int | None = param(None, Int(1, optional=True),
                                   "layer before which every audio and video token leaves (default: 23 of 28, scaled)")
    temperature: float = param(0.1, Float(0, 100, low_open=True), "softmax temperature of the window allocation")
    shrink_earlier_caches: bool = param(True, Bool(), "also drop the removed tokens from every earlier layer's cache "
                                                      "(the reference); False keeps each layer's own tokens")

    name: ClassVar[str] = "seats"
    summary: ClassVar[str] = "omni: windowed diverse pre-LLM selection, windowed in-LLM drops, late removal (SEATS)"
    keep_means: ClassVar[str] = ("equivalent average share of each video's tokens per layer (keep_audio: of each "
                                 "audio clip's)")
    modalities: ClassVar[tuple[str, ...]] = ("image", "video", "audio")
    passes_through: ClassVar[tuple[str, ...]] = ("image",)
    default_positions: ClassVar[str | None] = "original"
    variable_counts: ClassVar[bool] = True
    attention_scored: ClassVar[bool] = False
    shrinks_earlier_caches: ClassVar[bool] = False  # set per instance from shrink_earlier_caches

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shrinks_earlier_caches = self.shrink_earlier_caches

    # ------------------------------------------------------------------ budget
    def target(self, tokens: int, modality: str) -> float:
        keep = self.keep_for(modality)
        return keep / tokens if isinstance(keep, int) else float(keep)

    def keeps_all(self, modality: str) -> bool:
        """A modality whose budget is 1.0 is never pruned, at any stage (the late removal included)."""
        keep = self.keep_for(modality)
        return modality == "image" or (isinstance(keep, float) and keep == 1.0)

    def keeps_everything(self) -> bool:
        return self.keeps_all("video") and self.keeps_all("audio")

    def schedule_layers(self, num_layers: int) -> tuple[list[int], int]:
        default_layers, default_late = REFERENCE_SCHEDULES.get(num_layers, (
            [round(layer * num_layers / PAPER_DEPTH) for layer in PAPER_LAYERS],
            round(PAPER_LATE * num_layers / PAPER_DEPTH)))
        layers = list(self.layers) if self.layers is not None else default_layers
        late = self.late_layer if self.late_layer is not None else default_late
        stages = [*layers, late]
        if stages != sorted(set(stages)) or stages[0] < 1 or late >= num_layers:
            raise ValueError(f"seats: drop layers {layers} and late layer {late} must increase strictly within "
                             f"1..{num_layers - 1} for a {num_layers}-layer language model; pass layers=[...] and "
                             "late_layer=...")
        return layers, late

    def check_model(self, num_layers: int) -> None:
        self._num_layers = num_layers
        if not self.keeps_everything():
            self.schedule_layers(num_layers)

    # ------------------------------------------------------------------ stage I: before the LLM
    def prune_image(self, tokens: MediaItem) -> Selection:
        n = tokens.num_tokens
        if self.keeps_all(tokens.modality):
            return Selection.identity(n, device=tokens.embeds.device)
        ratio = self.encoder_ratio_scale * self.target(n, tokens.modality)
        if tokens.modality == "video":
            window = self.grid_in_window * tokens.frames[0].size
        else:
            window = max(1, round(self.audio_window_seconds / (tokens.token_seconds or 1 / AUDIO_TOKENS_PER_SECOND)))
        # items whose encoder gives no attention statistic (pooled LLaVA video frames): diversity alone, the code's
        # unweighted mode
        attention = (tokens.token_attention.float().mean(dim=0) if tokens.has("token_attention")
                     else torch.full((n,), 1e-6, device=tokens.embeds.device))
        picked = []
        for start in range(0, n, window):
            end = min(start + window, n)
            count = max(1, min(end - start, round(ratio * (end - start))))
            picked.append(start + diverse_subset(tokens.embeds[start:end], attention[start:end], count))
        return Selection.of(torch.cat(picked))

    # ------------------------------------------------------------------ stages II and III: inside the LLM
    def plan(self, images: list, num_layers: int) -> tuple[list[int], list[list[int]]]:
        if self.keeps_everything():  # nothing leaves at any stage: one no-op stage keeps the engine's contract
            return [num_layers - 1], [[image.count] for image in images]
        layers, late = self.schedule_layers(num_layers)
        self._stages = (layers, late)
        # with the pre-LLM level at encoder_ratio_scale * R the ratios do not depend on R: one list serves both
        # modalities and every item (the reference solves them per modality and gets the same numbers)
        self._ratios = ratios = keep_ratios(self.encoder_ratio_scale, 1.0, layers, late, num_layers)
        self._schedule = {"keep": self.keep, "keep_audio": self.keep_for("audio"), "layers": layers,
                          "late_layer": late, "keep_ratios": ratios}
        return [*layers, late], [[image.count] * (len(layers) + 1) for image in images]

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        device = ctx.hidden.device
        if self.keeps_everything():
            return [Selection.identity(track.count, device=device) for track in ctx.tracks]
        layers, late = self._stages
        media = [track for track in ctx.tracks if not self.keeps_all(track.modality)]
        if stage == len(layers):  # late removal: every audio and video token leaves
            return [Selection.identity(t.count, device=device) if self.keeps_all(t.modality)
                    else Selection(slots=torch.empty(0, dtype=torch.long, device=device)) for t in ctx.tracks]
        scores = ctx.attention(ctx.layer - 1, ctx.last_token().unsqueeze(1), on=ctx.layer).mean(dim=1)[:, 0]
        kept: dict[int, torch.Tensor] = {}
        for sample in sorted({t.sample for t in media}):
            kept[sample] = self._allocate(scores[sample], [t for t in media if t.sample == sample], stage)
        return [Selection.identity(t.count, device=device) if self.keeps_all(t.modality)
                else Selection.of(torch.nonzero(torch.isin(t.positions, kept[t.sample])).reshape(-1))
                for t in ctx.tracks]

    def _allocate(self, scores: torch.Tensor, tracks: list, stage: int) -> torch.Tensor:
        """Sequence positions of one sample's audio and video tokens that stay at drop ``stage``."""
        positions = {m: torch.sort(torch.cat([t.positions for t in tracks if t.modality == m]
                                             or [torch.empty(0, dtype=torch.long, device=scores.device)])).values
                     for m in ("video", "audio")}
        totals = {m: max(1, round(self._ratios[stage] * p.numel())) if p.numel() else 0
                  for m, p in positions.items()}
        runs = {m: contiguous_runs(p) for m, p in positions.items()}
        windows = max(len(runs["video"]), len(runs["audio"]))
        if windows <= 1 or not (positions["video"].numel() and positions["audio"].numel()):
            return torch.cat([p[top(scores[p], totals[m])] for m, p in positions.items() if p.numel()])
        budgets = window_budgets(scores, runs, totals, self.temperature)
        out = []
        for m in ("video", "audio"):
            for run, budget in zip(runs[m], budgets[m]):
                out.append(run[top(scores[run], int(budget))])
        return torch.cat(out)


def top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values`` (ties: the earlier)."""
    return torch.argsort(values.float(), descending=True, stable=True)[:k]


def contiguous_runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Ascending ``positions`` split where they stop being consecutive."""
    if positions.numel() == 0:
        return []
    breaks = (torch.nonzero(positions[1:] - positions[:-1] > 1).reshape(-1) + 1).tolist()
    return list(torch.tensor_split(positions, breaks))


def window_budgets(scores: torch.Tensor, runs: dict, totals: dict, temperature: float) -> dict:
    """SEATS' inter-window and intra-window allocation: ``{modality: per-window token counts}``. The i-th video run
    and the i-th audio run share window i (a modality with fewer runs has empty windows at the end). The window
    budgets sum to the total; each modality present in a window then keeps at least one token, so a window with a
    budget of 1 and both modalities keeps 2 (as the code)."""
    windows = max(len(runs["video"]), len(runs["audio"]))
    sizes = {m: torch.tensor([r.numel() for r in runs[m]] + [0] * (windows - len(runs[m]))) for m in runs}
    means = {m: torch.tensor([float(scores[r].float().mean()) for r in runs[m]] + [0.0] * (windows - len(runs[m])))
             for m in runs}
    weights = {m: F.softmax(means[m] / max(temperature, 1e-4), dim=0) for m in runs}
    capacity = sizes["video"] + sizes["audio"]
    total = totals["video"] + totals["audio"]
    budget = ((weights["video"] + weights["audio"]) / 2 * total).round().long().clamp(min=1)
    budget = torch.minimum(budget, capacity)
    diff = int(budget.sum()) - total
    while diff != 0:
        if diff > 0:
            movable = budget > 1
            if not movable.any():
                break
            budget[torch.where(movable, budget, torch.full_like(budget, -1)).argmax()] -= 1
        else:
            movable = budget < capacity
            if not movable.any():
                break
            budget[torch.where(movable, budget, torch.full_like(budget, int(capacity.max()) + 1)).argmin()] += 1
        diff = int(budget.sum()) - total
    share_v = weights["video"] * totals["video"]
    share_a = weights["audio"] * totals["audio"]
    fraction = share_v / (share_v + share_a + 1e-12)
    video = torch.minimum((budget.float() * fraction).round().long().clamp(min=0), sizes["video"])
    audio = torch.minimum((budget - video).clamp(min=0), sizes["audio"])
    rest = budget - video - audio
    extra = torch.minimum(rest.clamp(min=0), (sizes["video"] - video).clamp(min=0))
    video, rest = video + extra, rest - extra
    audio = audio + torch.minimum(rest.clamp(min=0), (sizes["audio"] - audio).clamp(min=0))
    fix = (sizes["video"] > 0) & (video < 1)
    video = torch.where(fix, torch.ones_like(video), video)
    recalc = torch.minimum(sizes["audio"], (budget - video).clamp(min=0)).clamp(min=1)
    audio = torch.where(fix & (audio > 1), recalc, audio)
    fix = (sizes["audio"] > 0) & (audio < 1)
    audio = torch.where(fix, torch.ones_like(audio), audio)
    recalc = torch.minimum(sizes["video"], (budget - audio).clamp(min=0)).clamp(min=1)
    video = torch.where(fix & (video > 1), recalc, video)
    return {"video": video[:len(runs["video"])].tolist(), "audio": audio[:len(runs["audio"])].tolist()}
