"""LLaVA-PruMerge and PruMerge+: an adaptive number of tokens chosen as IQR outliers of [CLS] attention, each
merged with its key-nearest neighbours (PruMerge+ adds spatially uniform samples)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Float, Int, param

REFERENCE_NEIGHBOURS = 32
SAMPLE_DIVISOR = 3  # PruMerge+: the uniform samples are ``int(1 / ratio) // 3`` tokens apart


def iqr_outliers(values: torch.Tensor, factor: float = 1.5) -> int:
    """How many of ``values`` lie strictly above ``Q3 + factor * (Q3 - Q1)`` (quartiles interpolated linearly, as
    ``numpy.percentile``'s default)."""
    v = values.reshape(-1).double()
    if v.numel() == 0:
        return 0
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=v.dtype, device=v.device))
    return int((v > q3 + factor * (q3 - q1)).sum())


def sample_step(count: int, outliers: int) -> int:
    """PruMerge+'s distance between uniform samples among ``count`` tokens: ``(count // outliers) // 3`` (the code's
    ``int(int(1 / ratio) / 3)``; ``int(1 / ratio)`` equals ``576 // outliers`` for every count at 576 tokens), at
    least 1; with no outlier, ``count`` (an infinite step: position 0 alone)."""
    return max(1, (count // outliers) // SAMPLE_DIVISOR) if outliers else max(1, count)


def uniform_positions(count: int, step: int) -> torch.Tensor:
    """``0, step, 2 step, ... < count - 1`` (the code's ``arange(0, 575, step)`` for 576 tokens); ``[0]`` for a
    single token."""
    return torch.arange(0, max(count - 1, 1), step) if count else torch.arange(0)


def prumerge_tokens(features: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, chosen: torch.Tensor,
                    neighbours: int = REFERENCE_NEIGHBOURS,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PruMerge's merge over one image's ``n`` candidate tokens (rows of ``features`` ``(n, D)``, ``keys``
    ``(n, d)``, [CLS] ``attention`` ``(n,)``); ``chosen`` are the positions of the kept tokens, in output order.

    Each kept token ``i`` becomes ``x_i + sum_{j in nn(i)} a_j x_j`` over its ``neighbours`` most key-cosine-similar
    other tokens (kept or not; all of them when fewer exist), ``a`` unnormalised, ``x`` the original features (every
    update reads the unmerged tokens). ``bias`` ``(n,)``, when given, is added to every candidate ``j``'s similarity
    before the neighbours are ranked (Recoverable Compression's text score). Returns the ``(m, D)`` merged kept
    tokens and the extra token ``sum_{j not kept} a_j x_j`` (``None`` when every token is kept). Float32.
    """
    x = features.float()
    a = attention.float()
    n = x.shape[0]
    normed = F.normalize(keys.float(), p=2, dim=-1)
    rows = torch.arange(chosen.numel(), device=x.device)
    sim = normed[chosen] @ normed.T  # (m, n)
    if bias is not None:
        sim = sim + bias.float().to(sim.device)
    sim[rows, chosen] = float("-inf")  # a token is not its own neighbour
    width = min(neighbours, n - 1)
    merged = x[chosen].clone()
    if width > 0 and chosen.numel():
        nearest = torch.topk(sim, width, dim=1).indices
        weights = torch.zeros_like(sim).scatter_(1, nearest, a[nearest])
        merged += weights @ x
    pruned = torch.ones(n, dtype=torch.bool, device=x.device)
    pruned[chosen] = False
    extra = a[pruned] @ x[pruned] if bool(pruned.any()) else None
    return merged, extra


@dataclass
class PruMergePruner(PreLLMPruner):
    """An adaptive count of tokens (IQR outliers of [CLS] attention), each merged with its 32 key-nearest tokens,
    plus one token merging every pruned one.

    Paper: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (Shang et al., arXiv
    2403.15388, ICCV 2025); reference code 42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/
    clip_encoder.py`` ``token_prune_merge_advanced`` (PruMerge) and ``token_prune_merge_advanced_plus``
    (PruMerge+, :class:`PruMergePlusPruner`; ``if_adaptive=True``, the inference path).

    Rule (as the code, LLaVA-1.5, CLIP ViT-L/14-336, 576 patches):
      1. Attention: ``q`` and ``k`` are the full-width ``q_proj`` / ``k_proj`` outputs of the tower's **last** layer
         (index 23, hooked), and ``a = softmax(q_cls k^T / sqrt(1024))[1:]``: one head over the whole width, over
         [CLS] and the patches, [CLS]'s own entry then dropped. (The LLaVA features still come from layer -2.)
      2. Count: ``ratio`` = the share of ``a`` strictly above ``Q3 + 1.5 * IQR`` (numpy's linear percentiles); the
         ``int(576 * ratio)`` patches of highest ``a`` are kept, in descending ``a`` (not re-sorted).
      3. Merge, on the penultimate-layer (pre-projector) patch features ``x``: for each kept token ``i``, its 32
         most cosine-similar tokens by last-layer key (among every other patch, kept or pruned);
         ``x_i <- x_i + sum_j a_j x_j`` with ``a`` **unnormalised** (the code's division by ``sum a_j`` is commented
         out); every update reads the unmerged features.
      4. One extra token ``sum_{j pruned} a_j x_j`` is appended after the kept tokens; the projector maps them all.
    Output: ``count + 1`` tokens (the paper reports 32 on average, 5.5%).

    ``keep`` is an **upper bound** (``keep_means``): an image keeps ``min(count, keep - 1)`` outliers (the highest
    ``a``) plus the extra token, so at most ``keep`` tokens. ``after`` in ``stats`` is the real count and the
    image's ``note`` says what decided it. The default cap, half of each image's tokens, never binds PruMerge on
    real images (at most about a quarter of the values can lie above ``Q3``); ``keep=1.0`` is the identity, as for
    every method (not "no cap": pass e.g. ``0.999`` for the adaptive count alone).

    Deliberate differences:
      * the count is the number of outliers; the code's ``int(N * (outliers / N))`` equals it for ``N = 576``
        (checked for every count) but can fall one short at other ``N`` through float rounding;
      * float32 attention and merging (the code runs in the model's dtype, fp16); batches of any size, each image
        its own quartiles (the code pools the batch's values, i.e. assumes a batch of one); ranking ties go to the
        earlier token (the code's ``topk`` leaves them unspecified); fewer than 32 other tokens (tiny models): all
        of them are neighbours (the code's ``topk(32)`` would fail);
      * the extra token takes the slot of the pruned token of highest ``a`` (under ``positions="original"`` its
        position id); when no token is pruned (possible only on LLaVA-NeXT) it is not appended (the code would
        append zeros);
      * LLaVA-NeXT (the code prunes single 336 px images only): each packed token's ``a`` and key come from its
        own crop's [CLS] row and keys; one count, one merge and one extra token over the whole image's patches
        (base and high-res grids together); newline tokens are neither counted, kept, nor merged; under
        ``vision_feature_select_strategy="full"`` the [CLS] token is an LLM token and a candidate like the patches;
      * towers without [CLS] (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision): ``a`` is the head-mean attention each token
        receives at the adapter's layer (``token_attention``, the library's documented substitute, as FasterVLM),
        keys are the adapter's ``vision_keys`` (head-mean), and the merge runs on the LLM-input embeddings (their
        projector is not applied to merged encoder features). A substitute, not the paper's rule.
    """

    keep: int | float = 0.5
    neighbours: int = param(REFERENCE_NEIGHBOURS, Int(1), "key-nearest tokens merged into each kept token")
    iqr_factor: float = param(1.5, Float(0.0), "a token is an outlier above Q3 + iqr_factor * IQR of [CLS] attention")

    name: ClassVar[str] = "prumerge"
    summary: ClassVar[str] = ("IQR outliers of [CLS] attention (adaptive count) merged with their key-nearest "
                              "tokens (LLaVA-PruMerge)")
    keep_means: ClassVar[str] = "most visual tokens kept per image (the IQR outlier count decides)"
    variable_counts: ClassVar[bool] = True  # an image may keep fewer tokens than keep
    encoder_fields: ClassVar[tuple[str, ...]] = ("last_layer_cls_attention", "last_layer_keys")

    def select(self, tokens: MediaItem, k: int) -> Selection:
        device = tokens.embeds.device
        # newline tokens carry no attention: never counted, kept nor merged
        index = tokens.patch_indices()  # candidate position -> token index
        attention, keys, features, pre_projector = merge_inputs(tokens)
        a = attention.float().to(device)[index]
        n = index.numel()

        outliers = iqr_outliers(a, self.iqr_factor)
        room = k - 1  # the extra token takes one place
        order = torch.argsort(a, descending=True, stable=True)
        chosen = order[:min(outliers, room)]
        how = [f"{outliers} of {n} tokens above Q3 + {self.iqr_factor:g} IQR of [CLS] attention"]
        if outliers > room:
            how.append(f"capped at {room} by keep={self.keep!r}")
        chosen = self.add_samples(chosen, n, outliers, room, how)
        merged, extra = prumerge_tokens(features[index], keys[index], a, chosen, self.neighbours)
        slots = index[chosen]
        if extra is not None:
            pruned = torch.ones(n, dtype=torch.bool, device=device)
            pruned[chosen] = False
            top = torch.argmax(torch.where(pruned, a, torch.tensor(float("-inf"), device=device)))
            slots = torch.cat([slots, index[top].reshape(1)])
            merged = torch.cat([merged, extra.unsqueeze(0)])
        else:
            how.append("no token pruned: no extra token")
        embeds = tokens.project(merged.to(features.dtype)) if pre_projector else merged
        selection = Selection(slots=slots, embeds=embeds.to(tokens.embeds.dtype), merged=int(slots.numel()))
        selection.note = f"adaptive count: {'; '.join(how)}; {slots.numel()} tokens out"
        return selection

    def add_samples(self, chosen: torch.Tensor, n: int, outliers: int, room: int, how: list[str]) -> torch.Tensor:
        """The kept positions after ``chosen`` (the outliers); PruMerge adds none."""
        return chosen


@dataclass
class PruMergePlusPruner(PruMergePruner):
    """PruMerge plus spatially uniform samples: the outliers of :class:`PruMergePruner`, then every
    ``s``-th token not already chosen, then the same merge and extra token.

    Paper: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (arXiv 2403.15388,
    ICCV 2025), PruMerge+; reference code 42Shawn/LLaVA-PruMerge ``llava/model/multimodal_encoder/clip_encoder.py``
    ``token_prune_merge_advanced_plus`` with ``if_adaptive=True`` (the path its ``forward`` runs).

    Rule (as the code, 576 patches): after the ``o`` outliers (descending ``a``), the positions
    ``arange(0, 575, int(int(1 / ratio) / 3))`` (``ratio = o / 576``) that are not outliers are appended in
    ascending order; the merge (each kept token with its 32 key-nearest, ``a``-weighted) and the extra token of the
    pruned ones follow, as PruMerge. About 25% of the tokens on average (the paper's 144).

    ``keep`` is an upper bound, as for PruMerge: the outliers take up to ``keep - 1`` places; when the uniform
    samples do not fit in the rest, their step is widened (``s + 1``, ``s + 2``, ...) until they do (dropped when
    not even position 0 fits); ``note`` in ``stats`` gives the step used. The default cap, half of each image's
    tokens, binds only when more than about 1/9 of the tokens are outliers (step 2 or less).

    Deliberate differences besides PruMerge's (batches, float32, ties, families, slots): positions run over the
    image's ``n`` tokens as ``arange(0, n - 1, s)`` with ``s = (n // o) // 3`` (the code's 575 is ``n - 1``);
    the code fails where it has no outlier (``1 / 0``) or ``s`` is 0 (``ratio > 1/3``): here no outlier gives the
    single position 0 (the limit of an infinite step) and ``s`` is at least 1. LLaVA-NeXT: the positions index the
    image's patches in packed order (base grid, then the high-res grid row by row), newlines skipped.
    """

    name: ClassVar[str] = "prumerge_plus"
    summary: ClassVar[str] = "PruMerge's outliers plus spatially uniform samples, merged (LLaVA-PruMerge+)"

    def add_samples(self, chosen: torch.Tensor, n: int, outliers: int, room: int, how: list[str]) -> torch.Tensor:
        """``chosen``, then the uniform positions not in it (ascending), the step widened until they fit."""
        taken = torch.zeros(n, dtype=torch.bool)
        taken[chosen.cpu()] = True
        step = first = sample_step(n, outliers)
        while True:
            positions = uniform_positions(n, step)
            extra = positions[~taken[positions]]
            if chosen.numel() + extra.numel() <= room or step >= n:
                break
            step += 1
        if chosen.numel() + extra.numel() > room:
            extra = extra[:0]
            how.append(f"no uniform sample fits keep={self.keep!r}")
        elif step != first:
            how.append(f"uniform step widened from {first} to {step} to fit keep={self.keep!r}")
        how.append(f"{extra.numel()} uniform samples (step {step})")
        return torch.cat([chosen, extra.to(chosen.device)])


def merge_inputs(tokens: MediaItem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """What PruMerge's rule reads: (attention (N,), keys (N, d), features (N, D), whether the features are
    pre-projector): the last layer's single-head [CLS] row and full-width keys where the adapter captures them,
    else the head-mean [CLS] (or received) attention and head-mean keys of the feature layer."""
    if tokens.has("last_layer_cls_attention"):
        attention, keys = tokens.get("last_layer_cls_attention"), tokens.get("last_layer_keys")
    else:
        attention, keys = tokens.token_attention.float().mean(dim=0), tokens.get("vision_keys")
    if tokens.has("vision_features"):
        return attention, keys, tokens.get("vision_features"), True
    return attention, keys, tokens.embeds, False
