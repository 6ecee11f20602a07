"""ToMe: bipartite soft matching, merging each image's most similar token pairs until the budget is met."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Bool, param


def bipartite_merge(x: torch.Tensor, slots: torch.Tensor, size: torch.Tensor, r: int,
                    weighted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step: tokens alternate into A (even) and B (odd); each A token's most cosine-similar B token is its
    edge; the ``r`` A tokens with the strongest edges merge into their B token (size-weighted means when
    ``weighted``, else the plain mean of the B token and what merges into it). Returns ``[unmerged A in edge order,
    B]``: features, the original slot each output keeps, and how many original tokens each holds."""
    metric = x / x.norm(dim=-1, keepdim=True)
    scores = metric[::2] @ metric[1::2].T
    best, partner = scores.max(dim=-1)
    edges = torch.argsort(best, descending=True, stable=True)
    unmerged, merging = edges[r:], edges[:r]
    into = partner[merging]
    xa, xb, sa, sb = x[::2], x[1::2], size[::2], size[1::2]
    new_size = sb.index_add(0, into, sa[merging])
    if weighted:  # ToMe's merge_wavg: sums of size-weighted features over sums of sizes
        xb = (xb * sb[:, None]).index_add(0, into, xa[merging] * sa[merging, None]) / new_size[:, None]
    else:  # scatter_reduce(mean) including the B token itself
        xb = xb.scatter_reduce(0, into[:, None].expand(-1, x.shape[1]), xa[merging], reduce="mean", include_self=True)
    return (torch.cat([xa[unmerged], xb]), torch.cat([slots[::2][unmerged], slots[1::2]]),
            torch.cat([sa[unmerged], new_size]))


@dataclass
class ToMePruner(PreLLMPruner):
    """Merge each image's tokens by bipartite soft matching until ``keep`` remain.

    Paper: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023); reference code facebookresearch/ToMe
    (``tome/merge.py``: ``bipartite_soft_matching``, ``merge_wavg``). Used as a pre-LLM baseline by AIM and QuoTA.

    Rule (as the code), one step: split the tokens alternately into A and B, give each A token its most
    cosine-similar B token, merge the ``r`` A tokens with the most similar partners into them, output
    ``[unmerged A in edge order, B]`` (the spatial order is not kept, as in the code; each output keeps the slot, and
    under ``positions="original"`` the position, of its original token). Here the steps repeat with
    ``r = min(n - keep, n // 2)`` until ``keep`` tokens remain.

    Deliberate differences: the reference merges inside the ViT by ``r`` per layer with the attention keys as the
    metric; as a pre-LLM baseline (the catalog's reading) it runs on the projected tokens, which are also the metric;
    ``weighted=True`` (default) tracks sizes across steps as ``merge_wavg`` does, ``False`` is the plain
    ``scatter_reduce(mean)`` of one call; ties between equally strong edges go to the earlier A token (stable sort;
    the code's ``argsort`` leaves them unspecified). LLaVA-NeXT's newline tokens are tokens like any other (all the
    same, so they merge with each other first).
    """

    keep: int | float = 0.25
    weighted: bool = param(True, Bool(), "size-weighted means across steps (merge_wavg); False: plain mean")

    name: ClassVar[str] = "tome"
    summary: ClassVar[str] = "bipartite soft matching of the projected tokens down to the budget (ToMe)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        return merge_to_budget(tokens, k, lambda x, slots, size: bipartite_merge(
            x, slots, size, min(x.shape[0] - k, x.shape[0] // 2), self.weighted))


def merge_to_budget(tokens: MediaItem, k: int, step) -> Selection:
    """Repeat a merging ``step(x, slots, size) -> (x, slots, size)`` on an image's projected tokens until ``k``
    remain (ToMe's and PiToMe's loops); every output keeps the slot of its original token."""
    x = tokens.embeds.float()
    slots = torch.arange(tokens.num_tokens, device=x.device)
    size = torch.ones(tokens.num_tokens, device=x.device)
    while x.shape[0] > k:
        x, slots, size = step(x, slots, size)
    return Selection(slots=slots, embeds=x.to(tokens.embeds.dtype), merged=int((size > 1).sum()))
