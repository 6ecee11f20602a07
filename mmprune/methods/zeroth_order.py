"""ZOO-Prune: each token's sensitivity at the projector by zeroth-order probes, combined with diversity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Float, Int, param

# elements of the perturbed inputs and outputs held at once (directions are probed in chunks of this size)
PROBE_ELEMENTS = 1 << 25
# a sensitivity whose spread over an image is at most this fraction of its largest value is rounding, not signal:
# float32 central differences of a linear projector (Idefics3's) spread by ~1e-5; real projectors' by 1e-1 and more
FLAT_SPREAD = 1e-3


def flat_spread(dtype: torch.dtype) -> float:
    """The relative spread below which a sensitivity probed in ``dtype`` counts as constant: ``FLAT_SPREAD``, or
    ten machine epsilons of a coarser format (float16: 1e-2, bfloat16: 8e-2)."""
    return max(FLAT_SPREAD, 10 * torch.finfo(dtype).eps)


def probe_directions(seed: int, count: int, width: int) -> torch.Tensor:
    """``(count, width)`` float32 directions ``u ~ N(0, I)`` scaled to unit L2 norm, drawn on the CPU from a
    generator seeded with ``seed``: the same bank for every image (and every run)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return F.normalize(torch.randn(count, width, generator=generator, dtype=torch.float32), dim=-1)


def projector_sensitivity(features: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                          directions: torch.Tensor, step: float, out_width: int | None = None) -> torch.Tensor:
    """``(N,)`` ``S(i) = (1/m) sum_j ||M(x_i + h u_j) - M(x_i - h u_j)||_2 / 2h`` for the rows ``x_i`` of
    ``features`` ``(N, d)``, the projector ``M`` (applied row-wise) and the ``m`` directions ``u_j`` (every token
    probed along the same ones). The perturbed inputs are formed in float32 (float64 features: float64) and cast to
    the features' dtype (the projector's); the differences are taken in that precision too. ``out_width`` (the
    projector's output width, default ``d``) only sizes the chunks of directions probed at once."""
    precise = torch.promote_types(features.dtype, torch.float32)
    x = features.to(precise)
    n, width = x.shape
    total = torch.zeros(n, dtype=precise, device=x.device)
    chunk = max(1, PROBE_ELEMENTS // (n * (width + (out_width or width))))
    for bank in directions.to(x.device, precise).split(chunk):
        shift = step * bank.unsqueeze(1)  # (c, 1, d)
        plus = project((x + shift).reshape(-1, width).to(features.dtype)).to(precise)
        minus = project((x - shift).reshape(-1, width).to(features.dtype)).to(precise)
        difference = ((plus - minus) / (2 * step)).view(bank.shape[0], n, -1)
        total += difference.norm(dim=-1).sum(dim=0)
    return (total / directions.shape[0]).float()


def sensitivity_diverse(embeds: torch.Tensor, sensitivity: torch.Tensor, k: int, flat: float = 0.0) -> torch.Tensor:
    """ZOO-Prune's sensitivity-aware diversity selection, in pick order: with ``s`` the min-max normalised
    sensitivity (all ones when it is constant: its spread at most ``flat`` times its largest value), first
    ``argmax s``, then repeatedly ``argmax_i s_i (1 - max_{j in P} cos(z_i, z_j))`` over the tokens not yet picked
    ``P`` (``z``: ``embeds``); ties go to the lowest index."""
    s = sensitivity.float()
    low, high = s.min(), s.max()
    s = (s - low) / (high - low) if bool(high - low > flat * high.abs()) else torch.ones_like(s)
    z = F.normalize(embeds.float(), dim=-1)
    similarity = z @ z.T
    n = s.numel()
    chosen = torch.zeros(n, dtype=torch.bool, device=s.device)
    first = int(torch.argmax(s))
    order = [first]
    chosen[first] = True
    closest = similarity[first].clone()  # each token's largest cosine to the picked set
    for _ in range(min(k, n) - 1):
        score = (s * (1.0 - closest)).masked_fill(chosen, float("-inf"))
        nxt = int(torch.argmax(score))
        order.append(nxt)
        chosen[nxt] = True
        closest = torch.maximum(closest, similarity[nxt])
    return torch.tensor(order, device=embeds.device)


@dataclass
class ZerothOrderPruner(PreLLMPruner):
    """Tokens whose projection moves most under small random perturbations of their vision features, picked
    greedily with a diversity factor.

    Paper: "ZOO-Prune: Training-Free Token Pruning via Zeroth-Order Gradient Estimation in Vision-Language Models"
    (Kim, Zhang, Liu, Jung, Lee, Hong; CVPR 2026, arXiv 2509.24837). Reference code: announced as AIM-SKKU/ZOO-Prune;
    the public repository holds only a README (read at 13096a4), so this is our reading of the paper (Eq. 2-4,
    Sec. 3.3), with the sharing of the directions across tokens as a third-party reproduction reports the code's
    ``llava_arch.py``. Own code.

    Rule, for an image's vision features ``x_i`` (the projector's input: the CLIP feature layer) and the projector
    ``M`` (the model's own, applied row-wise):
      1. Sensitivity: ``m`` (``directions`` = 64) directions ``u_j ~ N(0, I)``, each scaled to unit norm, shared by
         every token; ``S(i) = (1/m) sum_j ||(M(x_i + h u_j) - M(x_i - h u_j)) / 2h||_2`` with ``h`` (``step``) =
         0.01: the central-difference estimate of ``E_u ||J_M(x_i) u||``, forward passes of the projector only.
      2. Selection (SADS): ``s`` = ``S`` min-max normalised over the image; the first token is ``argmax s``, each
         next one ``argmax_i s_i * Div(i)``, ``Div(i) = 1 - max_{j picked} cos(z_i, z_j)`` on the projected tokens
         ``z`` (the LLM input), until ``k`` are picked. Kept indices are returned in original order.
    Defaults: ``m = 64``, ``h = 0.01`` (the paper's, for every model and task); budget 64 of 576, one of the paper's
    LLaVA-1.5 settings (64/128/192).

    Our choices where the paper is silent:
      * The direction bank is drawn from a CPU generator seeded with ``seed`` and is the same for every image, so a
        sample keeps the same tokens alone or in a padded batch, and runs repeat.
      * Ties go to the lowest index; picked tokens are excluded (so ``k`` distinct tokens are kept even where the
        products are all 0); a constant sensitivity (e.g. a linear projector, whose Jacobian is the same
        everywhere) normalises to all ones, so the selection is diversity alone from token 0 (min-max is 0/0).
        Constant means a spread over the image of at most ``FLAT_SPREAD`` (1e-3) of the largest value, or ten
        machine epsilons of a float16/bfloat16 projector: a linear projector's float32 central differences still
        spread by ~1e-5, and min-max would otherwise rank tokens by that rounding.
      * Precision: the perturbed features are cast to the projector's dtype. Under fp16/bf16 a step of 0.01 spread
        over ~1000 unit-norm components (about 3e-4 each) is near the format's resolution, so the estimate is
        coarse there; float32 models probe exactly as written.
      * The paper's rank-128 low-rank approximation of the projector for speed on LLaVA-NeXT is not reproduced:
        the full projector is probed.
    Families: LLaVA-1.5, LLaVA-NeXT, InternVL3, Gemma 3 and Idefics3 / SmolVLM (the adapters that expose the
    pre-projector features and the projector). LLaVA-NeXT: one selection over the whole image's patches (each with
    its own crop's features); newline tokens have no vision features, so they are never kept (``k`` above the
    patches keeps every patch). Not in the paper: InternVL3 and Idefics3 / SmolVLM, a token's features are its
    pixel-shuffled patch group, the vector the projector reads, so the probes perturb that, with one selection over
    the image's tiles and global image; Idefics3's projection is linear, so its sensitivity is constant and the
    selection is diversity alone (see above). Gemma 3, a token's features are its 4 x 4 average-pooled patches and
    the projector is the model's RMSNorm and linear map. Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 (whose merger
    the paper also probes) and LLaVA-OneVision expose neither, and are refused at attach.
    """

    keep: int | float = 64 / 576
    directions: int = param(64, Int(1), "random unit directions probing each token (m)")
    step: float = param(0.01, Float(0.0, low_open=True), "finite-difference step h of the central difference")
    seed: int = param(0, Int(0), "seed of the direction bank (the same for every image)")

    name: ClassVar[str] = "zeroth_order"
    summary: ClassVar[str] = ("projector sensitivity by zeroth-order random probes, times diversity, picked greedily "
                              "(ZOO-Prune)")
    families: ClassVar[tuple[str, ...]] = ("llava", "llava-next", "internvl", "gemma3", "idefics3")

    def select(self, tokens: MediaItem, k: int) -> Selection:
        if not tokens.has("vision_features"):
            raise ValueError(f"{self.name} perturbs the projector's input, and this model ({tokens.family}) exposes "
                             "no pre-projector features: it needs a CLIP tower with one integer vision_feature_layer")
        device = tokens.embeds.device
        valid = torch.ones(tokens.num_tokens, dtype=torch.bool, device=device)
        for segment in tokens.segments:  # newline tokens have no vision features
            newlines = segment.newline_indices()
            if newlines.numel():
                valid[newlines.to(device)] = False
        index = valid.nonzero().squeeze(1)
        features = tokens.get("vision_features").to(device)[index]
        directions = probe_directions(self.seed, self.directions, features.shape[-1])
        sensitivity = projector_sensitivity(features, tokens.project, directions, self.step, tokens.embeds.shape[-1])
        picks = sensitivity_diverse(tokens.embeds[index], sensitivity, k, flat_spread(features.dtype))
        selection = Selection.of(index[picks])
        if k > index.numel():
            selection.note = f"{index.numel()} patches kept of a budget of {k}: newline tokens are not candidates"
        return selection
