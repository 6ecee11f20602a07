"""FlashVLM: text relevance in the LLM space fused with encoder saliency, plus diverse background tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.fastervlm import token_scores
from mmprune.methods.params import Bool, Choice, Float, param
from mmprune.methods.vispruner import remove_duplicates

DAMPING = 0.1  # relevance below the top-p quantile is multiplied by this (the code's constant)
EPS = 1e-6  # the code's epsilon of its min-max normalisations and of the log-domain clamp


@dataclass
class FlashVLMPruner(PreLLMPruner):
    """Text-guided selection: top tokens by relevance x saliency, then VisPruner's diverse partition.

    Paper: "FlashVLM: Text-Guided Visual Token Selection for Large Multimodal Models" (arXiv 2512.20561); reference
    code CaiKaitong/FlashVLM (MIT), read at commit e1a80e8: ``llava/model/llava_arch.py`` (``encode_images`` and
    ``prepare_inputs_labels_for_multimodal``, LLaVA) and ``Qwen2_5VL/flashvlm_qwen_2_5_VL.py`` (Qwen2.5-VL). Own code.

    Rule (as the LLaVA code), for a budget ``k``:
      1. Relevance (extrinsic), in the LLM space: ``S = cos(v_i, t_l)`` between each projected vision token (the
         LLM input) and each text token's LLM input embedding; a soft maximum over the text tokens,
         ``s_i = sum_l softmax_l(S_il / text_temperature) S_il``; sharpening over the image,
         ``r = softmax_i(s / temperature) ** gamma``; min-max normalise; the tokens below the ``1 - top_p`` quantile
         (``torch.quantile``, linear interpolation) are multiplied by 0.1; min-max normalise again.
      2. Saliency (intrinsic): the head-mean [CLS] attention at the vision feature layer (``attentions[-2]``),
         min-max normalised.
      3. Log-domain fusion: ``score = exp((1 - eta) log A + eta log R)`` with ``A``, ``R`` clamped at ``1e-6``.
         (The min-max normalisation of ``score`` that follows in the code does not change the order; it is left out.)
      4. Diversity-preserving partition (VisPruner's, ``vispruner.remove_duplicates``): the top
         ``int(k * important_ratio)`` tokens by ``score`` stay; the others, in descending ``score`` order, lose up to
         8 tokens a round (those of the even list positions most similar, by the cosine of their pre-projector
         features, to a token at an odd position) until ``k - int(k * important_ratio)`` remain.
      5. Kept tokens in original order.
    Min-max normalisation is ``(x - min) / (max - min + 1e-6)`` as the code's. Defaults are the code's constants:
    ``important_ratio 0.5``, ``eta 0.5``, ``text_temperature 0.05``, ``temperature 0.01``, ``gamma 2.5``,
    ``top_p 0.005``; budget 128 of 576 (the paper's headline 77.8% pruning on LLaVA-1.5), as a fraction.

    Text tokens (``text``): ``"prompt"`` (default) is every text token of the sample (system prompt, chat template
    and instruction; ``prompt.embeds``), as the LLaVA code, which embeds all of ``input_ids`` but the image;
    ``"instruction"`` is the user's instruction only (``prompt.instruction_embeds``). The Qwen2.5-VL code takes the
    text *before* the first image (on its chat template: the system prompt and the user header, not a question
    that follows the image); that is not reproduced, both choices apply to every family.

    Norm gating (``norm_gating``): the Qwen2.5-VL code multiplies each normalised text embedding by its raw norm over
    the largest one; the LLaVA code computes the same gate on the already-normalised embeddings, where it is 1 (a
    no-op). ``None`` (default) follows the code of the family: on for the Qwen families, off elsewhere.

    Deliberate differences:
      * Ties (equal scores, equal duplicate scores) go to the lower index / earlier list position (stable sorts; the
        code's ``argsort`` leaves them unspecified); VisPruner's round size is also capped at the even half (see
        ``vispruner``).
      * Computed in float32; the code runs the relevance in the model's dtype (fp16), where the sharpened values
        underflow to 0 sooner (ties then resolved by saliency, as here below the 1e-6 clamp).
      * LLaVA-NeXT: the reference runs the rule per crop with the full budget each (and the relevance softmax over
        one crop). Here the budget and the softmax span the whole image (the library's convention), every patch
        scored by its own crop's [CLS] row and compared by its own crop's features; the newline tokens are not
        candidates (unless ``k`` exceeds the patches).
      * No [CLS] (Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision): saliency is the adapters' ``token_attention`` (on Qwen,
        the attention each merged token receives at the last vision block, as the Qwen2.5-VL code; it sums over
        queries where the adapter averages, which min-max normalisation cancels); without pre-projector features the
        partition compares the projected tokens, as the Qwen2.5-VL code does.
    """

    keep: int | float = 128 / 576
    important_ratio: float = param(0.5, Float(0.0, 1.0),
                                   "share of the budget kept by fused score (int(k * ratio)); the rest diverse")
    eta: float = param(0.5, Float(0.0, 1.0), "weight of text relevance against saliency in the log-domain fusion")
    temperature: float = param(0.01, Float(0.0, low_open=True),
                               "softmax temperature over the image's tokens that sharpens the relevance")
    text_temperature: float = param(0.05, Float(0.0, low_open=True),
                                    "softmax temperature of the soft maximum over the text tokens")
    gamma: float = param(2.5, Float(0.0, low_open=True), "power applied to the sharpened relevance")
    top_p: float = param(0.005, Float(0.0, 1.0),
                         "share of tokens above the quantile whose relevance stays whole (the rest is scaled by 0.1)")
    text: str = param("prompt", Choice(options=("prompt", "instruction")),
                      "text tokens compared: the whole prompt's (as the LLaVA code) or the instruction's")
    norm_gating: bool | None = param(None, Bool(optional=True),
                                     "weight text tokens by their embedding norm (None: on for Qwen, as its code)")

    name: ClassVar[str] = "flashvlm"
    summary: ClassVar[str] = "text relevance x encoder saliency, plus diverse background tokens (FlashVLM)"
    reads_prompt: ClassVar[bool] = True

    def select(self, tokens: MediaItem, k: int) -> Selection:
        prompt = self.prompt_of(tokens)
        saliency = token_scores(tokens, reduce="mean")
        patches = torch.isfinite(saliency).nonzero().squeeze(1)  # LLaVA-NeXT's newline tokens have no score
        device = saliency.device
        text = (prompt.embeds if self.text == "prompt" else prompt.instruction_embeds).to(device)
        gating = tokens.family.startswith("qwen") if self.norm_gating is None else self.norm_gating
        relevance = text_relevance(tokens.embeds[patches].to(device), text, self.text_temperature, self.temperature,
                                   self.gamma, self.top_p, gating)
        score = fuse(min_max(saliency[patches]), relevance, self.eta)
        order = patches[torch.argsort(score, descending=True, stable=True)]
        important_count = int(k * self.important_ratio)
        important, residual = order[:important_count], order[important_count:]
        if k - important_count > 0:
            features = tokens.get("vision_features") if tokens.has("vision_features") else tokens.embeds
            residual = remove_duplicates(features.to(device), residual, k - important_count)
        else:
            residual = residual[:0]
        kept = torch.cat([important, residual])
        if kept.numel() < k:  # only newline tokens are left to fill the budget
            kept = torch.cat([kept, (~torch.isfinite(saliency)).nonzero().squeeze(1)[: k - kept.numel()]])
        return Selection.of(kept)


def min_max(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + EPS)


def text_relevance(vision: torch.Tensor, text: torch.Tensor, text_temperature: float, temperature: float,
                   gamma: float, top_p: float, norm_gating: bool) -> torch.Tensor:
    """``(n,)`` FlashVLM's sharpened text relevance of ``vision`` ``(n, D)`` (LLM input embeddings) to ``text``
    ``(L, D)`` (LLM input embeddings), in ``[0, 1]``."""
    v = F.normalize(vision.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    if norm_gating:
        norms = text.float().norm(dim=-1)
        t = t * (norms / (norms.max() + EPS)).unsqueeze(-1)
    similarity = v @ t.T  # (n, L)
    pooled = (torch.softmax(similarity / text_temperature, dim=-1) * similarity).sum(-1)
    relevance = min_max(torch.softmax(pooled / temperature, dim=0) ** gamma)
    threshold = torch.quantile(relevance, 1 - top_p)
    relevance = torch.where(relevance >= threshold, relevance, relevance * DAMPING)
    return min_max(relevance)


def fuse(saliency: torch.Tensor, relevance: torch.Tensor, eta: float) -> torch.Tensor:
    """Log-domain weighting: ``saliency ** (1 - eta) * relevance ** eta``, both clamped at 1e-6 first."""
    return torch.exp((1 - eta) * torch.log(saliency.clamp_min(EPS)) + eta * torch.log(relevance.clamp_min(EPS)))
