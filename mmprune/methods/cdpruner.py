"""CDPruner: keep the subset of tokens a conditional DPP finds most diverse, the similarity weighted by the question."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Bool, Float, Instance, param

RELEVANCE_EPS = 1e-6  # added to the numerator of the code's min-max normalisation: the least relevant token keeps r > 0
CLIP_PARTS = ("text_model", "text_projection", "vision_model", "visual_projection")


@dataclass
class CDPrunerPruner(PreLLMPruner):
    """Greedy MAP of a conditional DPP whose kernel is the tokens' similarity weighted by their instruction relevance.

    Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
    (NeurIPS 2025, arXiv 2506.10967); reference code Theia-4869/CDPruner (Apache-2.0), read at commit 9541616:
    ``llava/model/llava_arch.py`` (``encode_images``, ``prepare_inputs_labels_for_multimodal``),
    ``llava/model/multimodal_encoder/clip_encoder.py``, ``llava/eval/model_vqa_loader.py``. Own code.

    Rule (as the code), for one image and a budget ``k``:
      1. Similarity ``S = cos(X, X)`` of the projected tokens ``X`` (the LLM input), in float32.
      2. Relevance: CLIP image embeddings of the patches, ``visual_projection(post_layernorm(h))`` with ``h`` the
         tower's feature-layer hidden states (``hidden_states[-2]``, the features LLaVA projects), against the
         instruction through CLIP's text tower with projection: the question's CLIP tokens (start and end tokens
         included, no truncation) zero-padded to a multiple of the text tower's 77 positions and encoded as ``M``
         segments of 77, one pooled embedding each (``M = 1`` for questions up to 77 tokens). Then
         ``r_i = mean_m(-cos(img_i, txt_m))`` (note the minus, see below), min-max normalised as the code:
         ``r = (r - min r + 1e-6) / (max r - min r)``.
      3. Kernel ``L = diag(r) S diag(r)``, i.e. ``L_ij = r_i S_ij r_j``.
      4. Fast greedy MAP inference for the DPP (Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal
         Point Process to Improve Recommendation Diversity", NeurIPS 2018), see :func:`dpp_greedy_map`: ``k`` times
         add the token ``j`` of largest ``d_j^2 = det L[S + j] / det L[S]``, kept by an incremental Cholesky
         update. Ties go to the lowest index (``argmax`` takes the first maximum, as the code's).
      5. The kept tokens in original order (the code sorts the picks).
    Defaults: budget 128 of 576 (the README's first example; the code's own ``--visual_token_num`` default 576
    prunes nothing), as a fraction. ``theta`` (``r <- exp(theta / (2 (1 - theta)) r)``, the relevance-diversity
    trade-off of Chen et al.) is commented out in the code: ``None`` (off) by default.

    Sign of the relevance (the issue asked to check it): the paper (Sec. 3.3) presents ``r`` as each token's
    relevance to the instruction, its cosine similarity to the instruction's embeddings averaged over them and
    min-max normalised, so a token that resembles the question should weigh more in ``L``. The released code negates
    the cosine before averaging and normalising (``encode_images`` in ``llava_arch.py``; ``scripts/
    visualize_relevance.py`` negates the map it draws the same way): the patch *least* similar to CLIP's text
    embedding gets ``r ~ 1``, the most similar ``r = 1e-6 / range ~ 0``. Users asked about the minus (CDPruner
    issues #14 and #19); the author answered (#14) that it is an "interesting phenomenon" they observed only with
    CLIP (as used in LLaVA), i.e. the minus is deliberate for CLIP. We follow the code that produced the published
    numbers: ``negate_relevance=True`` by default; ``negate_relevance=False`` is the formula as the paper writes it.

    Text tower (``text_encoder``): a stock Hugging Face LLaVA has no CLIP text tower and no ``visual_projection``,
    so the relevance has two paths:
      * ``text_encoder`` given (a ``transformers.CLIPModel``, with its ``CLIPTokenizer(Fast)`` or ``CLIPProcessor``
        as ``text_tokenizer``): the reference's rule. The image side uses that model's ``vision_model.post_layernorm``
        and ``visual_projection`` on the adapter's ``vision_features`` (the feature layer's hidden states), so pass
        the checkpoint the VLM's vision tower comes from (``openai/clip-vit-large-patch14-336`` for LLaVA-1.5 and
        LLaVA-NeXT). The reference uses its own tower's ``post_layernorm`` and that checkpoint's
        ``visual_projection``: the same weights, since LLaVA reads the tower before ``post_layernorm`` and never
        trains it. The text is ``prompt.text``, the
        instruction decoded by the tokenizer given at attach (``pruner.attach(model, tokenizer=processor)``);
        without one there is no text and ``select`` raises. Families without ``vision_features`` (Qwen2-VL,
        Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) are refused with this path.
      * ``text_encoder=None`` (default), a deliberate difference: the relevance compares the projected image tokens
        (the LLM input, ``X`` above) with the LLM input embeddings of the instruction's tokens
        (``prompt.instruction_embeds``, one row per token), averaged over the instruction's tokens instead of
        CLIP's ``M`` pooled segments; the same sign convention and normalisation follow. This is similarity in the
        LLM's input embedding space, not CLIP's joint image-text space: how it ranks the tokens differs, and the
        authors report the sign inversion for CLIP only, so on this path neither sign is theirs.

    Deliberate differences besides the fallback:
      * Text: the instruction as the model's tokenizer decodes it (``prompt.text``). The reference's evaluation
        passes the raw question with lmms-style answer-format sentences removed ("Answer the question using a
        single word or phrase.", in ``model_vqa_loader.py``); here such sentences stay in the text.
      * Min-max range: per image. The code's min and max run over its whole batch of crops (``relevance.min()``),
        i.e. over one image's crops at its evaluation batch size of 1; here an image's relevance never depends on
        the other images of the batch.
      * A constant relevance (max = min; the code divides by zero) gives ``r = 1`` for every token: plain DPP.
      * Singular kernel: the code never stops early (Chen et al. stop at ``d^2 < eps``). Once a pick's ``d^2`` is not
        positive (in float32 an exact zero often comes out slightly negative), its square root turns every score
        into NaN, the earlier picks' ``-inf`` included, so each later ``argmax`` returns index 0 or 1 (the first
        index other than the previous pick) and the code's mask ends up with fewer than ``k`` tokens. Here the
        picks up to and including that one stand and the rest of the budget is the unpicked tokens in index
        order, so exactly ``k`` tokens are kept.
      * Greedy MAP is not the exact MAP: it maximises ``log det L[S]`` one token at a time and can miss the best
        ``k``-subset (exact MAP of a DPP is NP-hard); this is what the paper and code do.
    Families:
      * LLaVA-1.5: the reference's setting.
      * LLaVA-NeXT: the reference prunes each crop (base and high-res) to ``k`` tokens before unpadding and keeps
        the newline tokens on top. Here the budget is global over the image's tokens (the library's convention,
        2880 -> 640 / 320 / 160), one DPP spans all patches of the packed image (each relevance from its own
        crop's features), and newline tokens are not candidates (kept only when ``k`` exceeds the patches, first
        ones first).
      * Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision: not in the released code (the paper reports Qwen2.5-VL
        and LLaVA-OneVision results); ``X`` is the post-merger / post-projector LLM input and only the
        ``text_encoder=None`` path applies.
    """

    keep: int | float = 128 / 576
    negate_relevance: bool = param(
        True, Bool(), "negate the token-instruction cosine before normalising, as the reference code (False: as the "
                      "paper's formula)")
    theta: float | None = param(
        None, Float(0.0, 1.0, high_open=True, optional=True),
        "relevance-diversity trade-off: r <- exp(theta / (2 (1 - theta)) r) (None: off, as the reference code)")
    text_encoder: Any = field(default=None, repr=False, metadata={
        "check": Instance(attributes=CLIP_PARTS, optional=True,
                          allowed="a CLIP model (e.g. transformers.CLIPModel: an object with text_model, "
                                  "text_projection, vision_model and visual_projection)"),
        "help": "CLIP model whose text tower and visual_projection score the relevance as the reference (None: "
                "cosine of the projected tokens to the instruction's LLM input embeddings)"})
    text_tokenizer: Any = field(default=None, repr=False, metadata={
        "check": Instance(callable=True, optional=True,
                          allowed="a tokenizer of the text_encoder (e.g. transformers.CLIPTokenizerFast or "
                                  "CLIPProcessor: called as tokenizer(text=..., return_tensors='pt'))"),
        "help": "the text_encoder's tokenizer (required with text_encoder)"})

    _text_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)

    modalities: ClassVar[tuple[str, ...]] = ("image",)
    name: ClassVar[str] = "cdpruner"
    summary: ClassVar[str] = "greedy MAP of a DPP on instruction-weighted token similarity (CDPruner)"
    reads_prompt: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.text_encoder is None) != (self.text_tokenizer is None):
            given, missing = (("text_encoder", "text_tokenizer") if self.text_tokenizer is None
                              else ("text_tokenizer", "text_encoder"))
            raise ValueError(f"{self.name}: {given} was given without {missing}: pass both (a CLIP model and its "
                             "tokenizer) or neither")

    def select(self, tokens: MediaItem, k: int) -> Selection:
        prompt = self.prompt_of(tokens)
        device = tokens.embeds.device
        candidates = tokens.patch_indices()
        if candidates.numel() <= k:  # only newline tokens are left to fill the budget
            others = torch.ones(tokens.num_tokens, dtype=torch.bool, device=device)
            others[candidates] = False
            return Selection.of(torch.cat([candidates, others.nonzero().squeeze(1)[: k - candidates.numel()]]))
        image, text = (self.clip_embeddings(tokens, candidates) if self.text_encoder is not None
                       else (tokens.embeds[candidates], prompt.instruction_embeds.to(device)))
        relevance = normalised_relevance(image, text, self.negate_relevance, self.theta)
        x = F.normalize(tokens.embeds[candidates].float(), dim=-1)
        kernel = relevance.unsqueeze(1) * (x @ x.T) * relevance.unsqueeze(0)
        return Selection.of(candidates[dpp_greedy_map(kernel, k)])

    def clip_embeddings(self, tokens: MediaItem, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, P)`` CLIP image embeddings of the candidate patches and ``(M, P)`` CLIP text embeddings of the
        instruction (the reference's two sides of the relevance)."""
        text = self.prompt_of(tokens).text
        if text is None:
            raise ValueError(f"{self.name}: text_encoder encodes the instruction's text, and this prompt has none: "
                             "pass the model's processor or tokenizer at attach "
                             "(pruner.attach(model, tokenizer=processor)) so the instruction can be decoded")
        if not tokens.has("vision_features"):
            raise ValueError(f"{self.name}: text_encoder scores the vision tower's feature-layer hidden states "
                             f"through CLIP's visual_projection, and the {tokens.family or 'model'} adapter does "
                             "not expose them (vision_features); use text_encoder=None on this family")
        clip = self.text_encoder
        features = tokens.get("vision_features")[candidates]
        width = clip.visual_projection.in_features
        if features.shape[-1] != width:
            raise ValueError(f"{self.name}: the text_encoder's vision width is {width} but this model's vision "
                             f"tower features have {features.shape[-1]}: pass the CLIP checkpoint the model's "
                             "vision tower comes from (openai/clip-vit-large-patch14-336 for LLaVA-1.5 / NeXT)")
        weight = clip.visual_projection.weight
        with torch.no_grad():
            image = clip.visual_projection(clip.vision_model.post_layernorm(features.to(weight.device, weight.dtype)))
        return image.to(tokens.embeds.device), self.text_embeddings(text).to(tokens.embeds.device)

    def text_embeddings(self, text: str) -> torch.Tensor:
        """``(M, P)`` projected pooled outputs of CLIP's text tower over the text's ``M`` zero-padded segments of
        ``max_position_embeddings`` tokens (the reference's encoding); the last text's result is reused."""
        key = (text, id(self.text_encoder), id(self.text_tokenizer))
        if self._text_cache is not None and self._text_cache[0] == key:
            return self._text_cache[1]
        clip = self.text_encoder
        encoded = self.text_tokenizer(text=text, return_tensors="pt")
        ids = encoded["input_ids"]
        mask = encoded.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        width = clip.config.text_config.max_position_embeddings
        pad = math.ceil(ids.shape[1] / width) * width - ids.shape[1]
        device = clip.text_projection.weight.device
        ids, mask = (F.pad(t, (0, pad)).reshape(-1, width).to(device) for t in (ids, mask))
        with torch.no_grad():
            embeds = clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        self._text_cache = (key, embeds)
        return embeds


def normalised_relevance(image: torch.Tensor, text: torch.Tensor, negate: bool = True,
                         theta: float | None = None) -> torch.Tensor:
    """``(N,)`` the reference's relevance: mean over the ``M`` text rows of the (negated) cosine of each of the
    ``N`` image rows, min-max normalised with the code's ``+1e-6`` in the numerator; optionally ``exp(alpha r)``."""
    cosine = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    score = cosine.mean(dim=1)
    if negate:
        score = -score
    low, span = score.min(), score.max() - score.min()
    relevance = (score - low + RELEVANCE_EPS) / span if float(span) > 0 else torch.ones_like(score)
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """``(k,)`` indices picked by fast greedy MAP inference on the DPP kernel ``kernel`` ``(N, N)`` (PSD), in pick
    order (Chen, Zhang & Zhou, NeurIPS 2018, Algorithm 1).

    ``d2[i]`` is the squared norm of token ``i``'s residual against the span of the picks, ``det L[S + i] /
    det L[S]``; ``c`` holds the picks' incremental Cholesky rows. Each step takes ``j = argmax d2`` (the first
    maximum) and updates ``e = (L[j] - c[:, j]^T c) / sqrt(d2[j])``, ``d2 -= e^2``. Once a pick's ``d2`` is not
    positive the kernel is singular on the picks: that pick stands and the rest of the budget is the unpicked
    indices in ascending order (the reference's scores turn to NaN there and repeat picks, see the class
    docstring). Runs without a host sync per step.
    """
    n = kernel.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"dpp_greedy_map: k={k} must be in 1..{n}")
    d2 = kernel.diagonal().clone()
    rows = kernel.new_zeros(k, n)
    picks = torch.empty(k, dtype=torch.long, device=kernel.device)
    picked_d2 = kernel.new_empty(k)
    for i in range(k):
        j = torch.argmax(d2).view(1)  # a (1,) tensor index: no host sync
        picks[i : i + 1] = j
        picked_d2[i : i + 1] = d2[j]
        e = ((kernel[j] - rows[:i, j].T @ rows[:i]) / torch.sqrt(d2[j]))[0]
        rows[i] = e
        d2 = (d2 - e * e).index_fill_(0, j, float("-inf"))
    singular = ~(picked_d2 > 0)
    if bool(singular.any()):
        last = int(singular.nonzero()[0])  # this pick stands; the ones after it were made from NaN scores
        picked = torch.zeros(n, dtype=torch.bool, device=kernel.device)
        picked[picks[: last + 1]] = True
        picks = torch.cat([picks[: last + 1], (~picked).nonzero().squeeze(1)[: k - last - 1]])
    return picks
