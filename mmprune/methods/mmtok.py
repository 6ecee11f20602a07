"""MMTok: keep the vision tokens that together best cover the question's tokens and the image's own tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Float, param

# the reference's text-vision temperature per model family (its LLaVA and Qwen2.5-VL wrappers' defaults)
TEXT_TEMPERATURE = {"llava": 0.02, "qwen": 0.01}


@dataclass
class MMTokPruner(PreLLMPruner):
    """Greedy maximum coverage of the instruction's tokens and of the image's tokens.

    Paper: "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs" (ICLR 2026, arXiv 2508.18264);
    reference code Ironieser/MMTok (Apache-2.0), read at commit d1522cd: ``mmtok/core/semantic_selector.py``
    (``mm_coverage_selection``), ``mmtok/core/mmtok_core.py``, ``mmtok/llava/*``, ``mmtok/qwen/*``. Own code.

    Rule (as the code), for a budget ``k`` over the image's ``n`` tokens and the instruction's ``m`` tokens:
      * Text-vision coverage ``P`` ``(m, n)``: cosine between each instruction token's LLM input embedding and
        each projected vision token (the LLM input), softmax over the vision tokens at temperature
        ``text_temperature``, divided by ``m``.
      * Vision-vision coverage ``Q`` ``(n, n)``: cosine between the vision tokens' pre-projector features (the CLIP
        feature layer, ``vision_features``), softmax over the columns at temperature ``vision_temperature``,
        divided by ``n``, times ``alpha``.
      * With ``C = [P; alpha Q]`` (rows: the things to cover, columns: the candidates), maximise the facility
        location function ``f(S) = sum_r max_{s in S} C[r, s]`` (``f({}) = 0``) greedily: ``k`` times add the
        candidate of largest marginal gain ``f(S + {j}) - f(S) = sum_r max(0, C[r, j] - max_{s in S} C[r, s])``.
      * Ties go to the lowest index (``argmax`` takes the first maximum, as the code's); kept tokens are returned in
        original order (``Selection.of`` sorts them, as the code does).
    Defaults: ``alpha = 0.5``, ``vision_temperature = 0.2``, ``text_temperature`` 0.02 on the LLaVA families and
    0.01 on the Qwen ones (the reference's LLaVA and Qwen2.5-VL defaults; ``None`` picks by family); budget 64 of
    576 (the reference's ``target_vision_tokens`` default), as a fraction.

    Deliberate differences:
      * Text tokens: every token of the user's instruction, as the model tokenised it (``prompt.instruction_embeds``).
        The reference re-tokenises the question word by word, and on LLaVA first drops lmms-eval's answer-format
        sentences ("Answer the question using a single word or phrase.", "Answer with the option's letter from the
        given choices directly.") and a stop-word list; on Qwen2.5-VL it embeds ``"Question: " + question``. The
        selector is given no tokenizer, so neither filter is applied.
      * LLaVA-1.5 padding: the reference excludes the patches that lie wholly in the pad-to-square border (computed
        from the original image size, which the selector is not given); here every patch is a candidate.
      * LLaVA-NeXT: the reference selects ``target_vision_tokens`` per crop, each crop covering only its own tokens,
        and drops the newline tokens. Here the budget is global over the image's tokens (the library's
        convention), one coverage problem spans all crops (each patch with its own crop's CLIP feature), and the
        newline tokens are neither covered nor chosen (unless ``k`` exceeds the patches: then the first newlines
        fill the rest).
      * No pre-projector features (Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision adapters expose none): the vision-vision
        cosine is on the projected tokens (the LLM input). The Qwen2.5-VL reference uses the mean of each merge
        unit's patch features at the last vision block.
      * The reference's optional agent that enriches the text with a small VLM's answer is not implemented.
    """

    keep: int | float = 64 / 576
    alpha: float = param(0.5, Float(0.0), "weight of the vision-vision coverage against the text-vision coverage")
    text_temperature: float | None = param(
        None, Float(0.0, low_open=True, optional=True),
        "softmax temperature of the text-vision cosines (None: 0.02 on LLaVA families, 0.01 on Qwen, as the reference)")
    vision_temperature: float = param(0.2, Float(0.0, low_open=True),
                                      "softmax temperature of the vision-vision cosines")

    name: ClassVar[str] = "mmtok"
    summary: ClassVar[str] = "greedy maximum coverage of the instruction's and the image's tokens (MMTok)"
    reads_prompt: ClassVar[bool] = True

    def select(self, tokens: MediaItem, k: int) -> Selection:
        prompt = self.prompt_of(tokens)
        patches = tokens.patch_indices()
        features = tokens.get("vision_features") if tokens.has("vision_features") else tokens.embeds
        text = prompt.instruction_embeds.to(tokens.embeds.device)
        gains = coverage_matrix(text, tokens.embeds[patches], features[patches].to(tokens.embeds.device),
                                self.temperature_for(tokens.family), self.vision_temperature, self.alpha)
        kept = patches[greedy_coverage(gains, min(k, patches.numel()))]
        if kept.numel() < k:  # only newline tokens are left to fill the budget
            others = torch.ones(tokens.num_tokens, dtype=torch.bool, device=kept.device)
            others[patches] = False
            kept = torch.cat([kept, others.nonzero().squeeze(1)[: k - kept.numel()]])
        return Selection.of(kept)

    def temperature_for(self, family: str) -> float:
        """The text-vision temperature: the field, or the reference's value for the model family."""
        if self.text_temperature is not None:
            return self.text_temperature
        return TEXT_TEMPERATURE["qwen" if family.startswith("qwen") else "llava"]


def coverage_matrix(text: torch.Tensor, vision: torch.Tensor, features: torch.Tensor, text_temperature: float,
                    vision_temperature: float, alpha: float) -> torch.Tensor:
    """``(m + n, n)`` MMTok's ``[P; alpha Q]``: row ``r`` is how much each candidate (column) covers text token ``r``
    (``r < m``) or vision token ``r - m``.

    ``text`` ``(m, D)`` LLM input embeddings, ``vision`` ``(n, D)`` the candidates' LLM input embeddings,
    ``features`` ``(n, d)`` their features for the vision-vision similarity.
    """
    t = F.normalize(text.float(), dim=-1)
    v = F.normalize(vision.float(), dim=-1)
    x = F.normalize(features.float(), dim=-1)
    m, n = t.shape[0], v.shape[0]
    text_cover = torch.softmax(t @ v.T / text_temperature, dim=1) / m
    vision_cover = torch.softmax(x @ x.T / vision_temperature, dim=1) / n
    return torch.cat([text_cover, alpha * vision_cover])


def greedy_coverage(gains: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy maximisation of the facility location ``f(S) = sum_r max_{s in S} gains[r, s]`` (non-negative
    ``gains``, ``f({}) = 0``): ``k`` column indices in pick order; ties to the lowest index.

    All marginal gains of a step are one tensor expression: ``sum_r max(0, gains[r, j] - covered[r])`` with
    ``covered[r] = max_{s in S} gains[r, s]``.
    """
    covered = torch.zeros(gains.shape[0], dtype=gains.dtype, device=gains.device)
    chosen = torch.zeros(gains.shape[1], dtype=torch.bool, device=gains.device)
    order = []
    for _ in range(k):
        marginal = (gains - covered.unsqueeze(1)).clamp_min_(0).sum(0)
        best = int(torch.argmax(marginal.masked_fill_(chosen, -math.inf)))
        order.append(best)
        chosen[best] = True
        covered = torch.maximum(covered, gains[:, best])
    return torch.tensor(order, dtype=torch.long, device=gains.device)
