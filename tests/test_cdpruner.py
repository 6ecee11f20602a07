"""CDPruner: the greedy DPP MAP against a brute-force determinant greedy, the relevance (its sign, normalisation,
theta), the LLM-embedding fallback and the CLIP text-encoder path on fixed tensors, newline tokens, and the errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import record_selects, tiny_model
from transformers import CLIPConfig, CLIPModel

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods.cdpruner import CDPrunerPruner, dpp_greedy_map, normalised_relevance
from mmprune.prompt import PromptText

# ---------------------------------------------------------------------------------------------- independent rules


def greedy_log_det(kernel: np.ndarray, k: int) -> list[int]:
    """Greedy MAP written from its definition: each step adds the index that maximises det L[S + j] (float64)."""
    chosen: list[int] = []
    for _ in range(k):
        dets = [np.linalg.det(kernel[np.ix_(chosen + [j], chosen + [j])]) if j not in chosen else -np.inf
                for j in range(len(kernel))]
        chosen.append(int(np.argmax(dets)))
    return chosen


def reference_relevance(image: np.ndarray, text: np.ndarray, negate: bool = True) -> np.ndarray:
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    score = (image @ text.T).mean(axis=1) * (-1 if negate else 1)
    return (score - score.min() + 1e-6) / (score.max() - score.min())


def expected_kept(embeds: np.ndarray, relevance: np.ndarray, k: int) -> list[int]:
    x = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    kernel = relevance[:, None] * (x @ x.T) * relevance[None, :]
    return sorted(greedy_log_det(kernel, k))


def item(embeds, instruction, segments=None, features=None, text=None, family="llava"):
    lazy = {} if features is None else {"vision_features": lambda: features}
    tokens = MediaItem(embeds, segments or [Segment(0, 1, embeds.shape[0])], lazy=lazy, family=family)
    count = instruction.shape[0]
    tokens.prompt = PromptText(ids=torch.arange(count), embeds=instruction, positions=torch.arange(count),
                               instruction=torch.ones(count, dtype=torch.bool), text=text)
    return tokens


def kept(pruner, tokens, k) -> list[int]:
    return pruner.select(tokens, k).kept()


# ------------------------------------------------------------------------------------------------- greedy MAP


@pytest.mark.parametrize("seed", range(4))
def test_greedy_map_equals_the_brute_force_determinant_greedy(seed):
    """N = 7, k = 3: the incremental Cholesky picks, in order, are the indices a greedy on det L[S + j] picks."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(7, 5, generator=g, dtype=torch.float64)
    relevance = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    x = torch.nn.functional.normalize(vectors, dim=-1)
    kernel = relevance[:, None] * (x @ x.T) * relevance[None, :]
    assert dpp_greedy_map(kernel, 3).tolist() == greedy_log_det(kernel.numpy(), 3)
    assert dpp_greedy_map(kernel.float(), 3).tolist() == greedy_log_det(kernel.numpy(), 3)


def test_greedy_map_is_not_the_exact_map():
    """a = (2, 0) has the largest diagonal, so greedy takes it and then b: det 4 * 1.125 = 4.5. The best pair is the
    orthogonal b, c: det 2.25 * 2.1025 = 4.73. Greedy keeps {a, b}; exact MAP would keep {b, c}."""
    s = np.sqrt(0.5)
    v = torch.tensor([[2.0, 0.0], [1.5 * s, 1.5 * s], [1.45 * s, -1.45 * s]], dtype=torch.float64)
    kernel = v @ v.T
    best = max(itertools.combinations(range(3), 2), key=lambda pair: np.linalg.det(kernel[list(pair)][:, list(pair)]))
    assert sorted(dpp_greedy_map(kernel, 2).tolist()) == [0, 1] and best == (1, 2)


def test_ties_go_to_the_lowest_index():
    assert dpp_greedy_map(torch.eye(5), 3).tolist() == [0, 1, 2]


def test_a_singular_kernel_fills_the_budget_with_unpicked_tokens_in_index_order():
    """Tokens e1, e1, e2, e2, e1, e2: after 0 and 2 every residual is 0. The third pick (index 1, d^2 = 0) stands; the
    reference's NaNs would then repeat indices 0 and 1, here 3 and 4 fill the budget."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    v = torch.stack([e1, e1, e2, e2, e1, e2])
    assert dpp_greedy_map(v @ v.T, 5).tolist() == [0, 2, 1, 3, 4]


# --------------------------------------------------------------------------------------------------- relevance


def fixed_case(seed=0, n=8, dim=6, words=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(words, dim, generator=g)


@pytest.mark.parametrize("negate", [True, False])
def test_fallback_relevance_is_the_cosine_to_the_instructions_llm_embeddings(negate):
    embeds, instruction = fixed_case()
    pruner = CDPrunerPruner(negate_relevance=negate)
    relevance = reference_relevance(embeds.numpy(), instruction.numpy(), negate)
    for k in (1, 3, 5):
        assert kept(pruner, item(embeds, instruction), k) == expected_kept(embeds.numpy(), relevance, k)


def test_the_default_sign_favours_the_tokens_least_like_the_instruction():
    """The reference code's minus: with k = 1 (the largest L_ii = r_i^2) the default keeps the token least similar to
    the instruction, the paper's formula (negate_relevance=False) the most similar one."""
    embeds, instruction = fixed_case(seed=3)
    cosine = torch.nn.functional.cosine_similarity(embeds[:, None], instruction[None], dim=-1).mean(1)
    assert kept(CDPrunerPruner(), item(embeds, instruction), 1) == [int(cosine.argmin())]
    assert kept(CDPrunerPruner(negate_relevance=False), item(embeds, instruction), 1) == [int(cosine.argmax())]
    assert int(cosine.argmin()) != int(cosine.argmax())


def test_relevance_is_min_max_normalised_with_the_codes_epsilon_and_theta_exponentiates_it():
    embeds, instruction = fixed_case()
    plain = normalised_relevance(embeds, instruction)
    expected = reference_relevance(embeds.numpy(), instruction.numpy())
    np.testing.assert_allclose(plain.numpy(), expected, rtol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(embeds[:, None], instruction[None], dim=-1).mean(1)
    span = float(cosine.max() - cosine.min())
    assert float(plain.min()) == pytest.approx(1e-6 / span) and float(plain.max()) == pytest.approx(1 + 1e-6 / span)
    np.testing.assert_allclose(normalised_relevance(embeds, instruction, theta=0.75).numpy(),
                               np.exp(0.75 / 0.5 * expected), rtol=1e-5)


def test_theta_changes_the_kept_tokens_as_computed_directly():
    embeds, instruction = fixed_case(seed=1, n=10)
    relevance = np.exp(0.5 * reference_relevance(embeds.numpy(), instruction.numpy()))
    assert kept(CDPrunerPruner(theta=0.5), item(embeds, instruction), 4) == expected_kept(embeds.numpy(), relevance, 4)


def test_a_constant_relevance_is_a_plain_dpp_on_the_similarity():
    """One instruction token orthogonal to every image token: every cosine is 0, max = min (the code divides by
    zero); here r = 1 and the kernel is the similarity itself."""
    embeds = torch.cat([torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), torch.zeros(6, 1)], dim=1)
    instruction = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    assert torch.equal(normalised_relevance(embeds, instruction), torch.ones(6))
    assert kept(CDPrunerPruner(), item(embeds, instruction), 3) == expected_kept(embeds.numpy(), np.ones(6), 3)


def test_llava_next_newline_tokens_are_not_candidates_unless_the_budget_needs_them():
    """A 2x2 base grid, then a 2x2 high-res grid whose rows end with newlines (tokens 6 and 9)."""
    embeds, instruction = fixed_case(seed=4, n=10)
    segments = [Segment(0, 2, 2), Segment(4, 2, 2, newline=True)]
    patches = [0, 1, 2, 3, 4, 5, 7, 8]
    relevance = reference_relevance(embeds[patches].numpy(), instruction.numpy())
    expected = [patches[i] for i in expected_kept(embeds[patches].numpy(), relevance, 4)]
    assert kept(CDPrunerPruner(), item(embeds, instruction, segments), 4) == expected
    assert kept(CDPrunerPruner(), item(embeds, instruction, segments), 9) == sorted(patches + [6])


# ------------------------------------------------------------------------------------------- CLIP text encoder


def tiny_clip(vision_width=8, positions=8) -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=positions, bos_token_id=1, eos_token_id=39,
                         pad_token_id=0),
        vision_config=dict(hidden_size=vision_width, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=12)
    return CLIPModel(config).eval()


class WordTokenizer:
    """A stand-in CLIP tokenizer: start token 1, one id per word (3 + its length), end token 39."""

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[1] + [3 + len(word) for word in text.split()] + [39]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


QUESTION = "what is written on the small sign next to the red door ?"  # 13 words: 15 tokens, 2 segments of 8


def clip_case(seed=5, n=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 8, generator=g), torch.randn(3, 6, generator=g)


def test_the_text_encoder_path_scores_clip_image_embeddings_against_the_questions_clip_segments():
    """The reference's relevance: visual_projection(post_layernorm(features)) against the text tower's projected
    pooled outputs of the question's zero-padded 8-token segments (2 here), averaged."""
    clip, tokenizer = tiny_clip(), WordTokenizer()
    embeds, features, instruction = clip_case()
    encoded = tokenizer(text=QUESTION)
    ids = torch.nn.functional.pad(encoded["input_ids"], (0, 1)).view(2, 8)
    mask = torch.nn.functional.pad(encoded["attention_mask"], (0, 1)).view(2, 8)
    with torch.no_grad():
        text = clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        image = clip.visual_projection(clip.vision_model.post_layernorm(features))
    relevance = reference_relevance(image.numpy(), text.numpy())
    pruner = mmprune.get("cdpruner", text_encoder=clip, text_tokenizer=tokenizer)
    tokens = item(embeds, instruction, features=features, text=QUESTION)
    assert pruner.text_embeddings(QUESTION).shape == (2, 12)
    for k in (2, 4):
        assert kept(pruner, tokens, k) == expected_kept(embeds.numpy(), relevance, k)


def test_the_question_is_encoded_once_for_every_image_of_a_sample(monkeypatch):
    clip, tokenizer = tiny_clip(), WordTokenizer()
    calls = []
    forward = clip.text_model.forward
    monkeypatch.setattr(clip.text_model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    pruner = CDPrunerPruner(text_encoder=clip, text_tokenizer=tokenizer)
    embeds, features, instruction = clip_case()
    for _ in range(2):
        pruner.select(item(embeds, instruction, features=features, text=QUESTION), 3)
    assert len(calls) == 1
    pruner.select(item(embeds, instruction, features=features, text="another question"), 3)
    assert len(calls) == 2


def test_the_text_encoder_needs_the_decoded_instruction():
    embeds, features, instruction = clip_case()
    pruner = CDPrunerPruner(text_encoder=tiny_clip(), text_tokenizer=WordTokenizer())
    with pytest.raises(ValueError, match=r"cdpruner: text_encoder encodes the instruction's text, and this prompt "
                                         r"has none: pass the model's processor or tokenizer at attach"):
        pruner.select(item(embeds, instruction, features=features, text=None), 3)


def test_the_text_encoder_needs_the_towers_features_of_the_same_width():
    embeds, features, instruction = clip_case()
    pruner = CDPrunerPruner(text_encoder=tiny_clip(), text_tokenizer=WordTokenizer())
    with pytest.raises(ValueError, match=r"the qwen2-vl adapter does not expose them \(vision_features\); use "
                                         r"text_encoder=None on this family"):
        pruner.select(item(embeds, instruction, text=QUESTION, family="qwen2-vl"), 3)
    with pytest.raises(ValueError, match=r"the text_encoder's vision width is 8 but this model's vision tower "
                                         r"features have 5"):
        pruner.select(item(embeds, instruction, features=features[:, :5], text=QUESTION), 3)


def test_through_the_engine_without_a_tokenizer_the_text_encoder_path_raises_one_clear_error():
    model = tiny_model("llava")
    clip = tiny_clip(vision_width=model.config.vision_config.hidden_size)
    pruner = mmprune.get("cdpruner", keep=4, text_encoder=clip, text_tokenizer=WordTokenizer())
    with pruner.attach(model), torch.no_grad(), pytest.raises(ValueError, match="pass the model's processor"):
        model(**tiny.batch("llava", [[3, ("img", 0), 4]]))


def test_through_the_engine_the_clip_tokenizer_receives_the_decoded_question(monkeypatch):
    """The shipped LLaVA and its processor at attach: the CLIP tokenizer is given the user's question (not the chat
    template), and the kept set is the one computed from the tower's features and the projected tokens."""
    from PIL import Image

    from mmprune.zoo import load_shipped

    model, processor = load_shipped()
    seen_texts, seen_items = [], record_selects(monkeypatch, CDPrunerPruner)

    class Recording(WordTokenizer):
        def __call__(self, text, return_tensors="pt"):
            seen_texts.append(text)
            return super().__call__(text, return_tensors)

    clip = tiny_clip(vision_width=model.config.vision_config.hidden_size, positions=77)
    pruner = mmprune.get("cdpruner", keep=16, text_encoder=clip, text_tokenizer=Recording())
    image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                           "text": "what color is the circle?"}]}], add_generation_prompt=True)
    with pruner.attach(model, tokenizer=processor), torch.no_grad():
        model(**processor(text=[text], images=[image], return_tensors="pt"))
    assert seen_texts == ["what color is the circle ?"]
    (tokens, k), = seen_items
    with torch.no_grad():
        image_side = clip.visual_projection(clip.vision_model.post_layernorm(tokens.get("vision_features")))
    relevance = reference_relevance(image_side.numpy(), pruner.text_embeddings(seen_texts[0]).numpy())
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected_kept(tokens.embeds.numpy(), relevance, k)


@pytest.mark.parametrize(("params", "message"), [
    ({"text_encoder": "openai/clip-vit-large-patch14-336"},
     "cdpruner: text_encoder='openai/clip-vit-large-patch14-336' is not valid: expected None or a CLIP model"),
    ({"text_encoder": torch.nn.Linear(2, 2), "text_tokenizer": WordTokenizer()},
     "cdpruner: text_encoder=Linear"),
    ({"text_tokenizer": WordTokenizer()},
     "cdpruner: text_tokenizer was given without text_encoder: pass both"),
    ({"theta": 1.0}, r"cdpruner: theta=1.0 is not valid: expected None or a number in \[0, 1\)"),
])
def test_bad_arguments_fail_at_get(params, message):
    with pytest.raises(ValueError, match=message):
        mmprune.get("cdpruner", **params)
    with pytest.raises(ValueError, match="cdpruner: text_encoder was given without text_tokenizer: pass both"):
        mmprune.get("cdpruner", text_encoder=tiny_clip())
