"""The prompt-reading contract of pre-LLM methods: what the engine hands a method that reads the question (ids,
embeddings, which tokens are the instruction), and what it must not change for the methods that do not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import keep_for, record_selects, tiny_model
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mmprune
import tiny
from mmprune.engine.session import final_kept
from mmprune.media import Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.prompt import TemplateSpec, prompt_text

# options that make a method read the prompt (its class default does not)
PROMPT_OPTIONS = {"idpruner": dict(importance="text")}
TEXT_GUIDED = sorted({name for name, cls in mmprune.METHODS.items() if cls.reads_prompt} | set(PROMPT_OPTIONS))
VISION_ONLY = sorted(name for name, cls in mmprune.METHODS.items()
                     if cls.stage == "pre-llm" and not cls.reads_prompt and cls.prunes("image"))  # defaults
# two questions of the same length, with no token in common
QUESTION_A, QUESTION_B = ("txt", [40, 41, 42, 43, 44]), ("txt", [70, 71, 72, 73, 74])


@dataclass
class PromptProbe(PreLLMPruner):
    """Keeps the tokens most aligned with the instruction's mean embedding; records every prompt it is given."""

    name: ClassVar[str] = "prompt_probe"
    reads_prompt: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seen = []

    def select(self, tokens, k):
        self.seen.append(tokens)
        scores = tokens.embeds.float() @ tokens.prompt.instruction_embeds.float().mean(0)
        return Selection.of(scores.topk(k).indices)


def qwen_style_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with a Qwen-style chat template: a default system turn, image wrappers
    (``<|vision_start|>``, ``<|vision_end|>``) and an assistant header after the user's turn."""
    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "system",
             "user", "assistant", "You", "are", "a", "helpful", ".", "what", "colour", "is", "the", "circle", "?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=template,
                                        additional_special_tokens=words[1:6])
    return tokenizer


def test_template_spec_finds_the_turns_and_the_image_wrappers():
    tokenizer = qwen_style_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    spec = TemplateSpec.from_tokenizer(tokenizer, [ids("<|image_pad|>")])
    assert spec.head == ids(["<|im_start|>", "system", "You", "are", "a", "helpful", "assistant", ".", "<|im_end|>",
                             "<|im_start|>", "user"])
    assert spec.tail == ids(["<|im_end|>", "<|im_start|>", "assistant"])
    assert spec.before_media == ids(["<|vision_start|>"]) and spec.after_media == ids(["<|vision_end|>"])


@pytest.mark.parametrize("question_first", [False, True])
def test_the_instruction_is_the_users_text_without_template_or_wrappers(question_first):
    tokenizer = qwen_style_tokenizer()
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    spec = TemplateSpec.from_tokenizer(tokenizer, [pad])
    image = [{"type": "image"}]
    question = [{"type": "text", "text": "what colour is the circle?"}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": question + image if question_first
                                           else image + question}], tokenize=False, add_generation_prompt=True)
    row = tokenizer(text.replace("<|image_pad|>", "<|image_pad|> " * 4))["input_ids"]  # the image as 4 tokens
    ids = torch.tensor([0, 0, *row])  # left padding
    real = torch.tensor([0, 0] + [1] * len(row))
    embeds = torch.randn(len(ids), 8)
    prompt = prompt_text(ids, embeds, real, ids == pad, spec, tokenizer)
    assert prompt.text == "what colour is the circle ?" and prompt.located == "template"
    assert tokenizer.convert_ids_to_tokens(prompt.instruction_ids.tolist()) == ["what", "colour", "is", "the",
                                                                               "circle", "?"]
    assert torch.equal(prompt.embeds, embeds[prompt.positions])
    assert not bool((ids[prompt.positions] == pad).any()) and int(prompt.positions[0]) == 2  # no padding, no media
    without = prompt_text(ids, embeds, real, ids == pad, None)
    if question_first:  # no template known: only <|vision_end|> and the template's tail follow the image
        assert tokenizer.convert_ids_to_tokens(without.instruction_ids.tolist()) == [
            "<|vision_end|>", "<|im_end|>", "<|im_start|>", "assistant"]
    else:
        assert without.instruction_ids.tolist()[1:7] == prompt.instruction_ids.tolist()
    assert without.located == "after media" and without.text is None


def test_the_shipped_processor_tells_the_question_from_the_template():
    from mmprune.zoo import load_shipped

    model, processor = load_shipped()
    image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    questions = ["what color is the circle?", "how many squares?"]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in questions]
    inputs = processor(text=texts, images=[image, image], padding=True, return_tensors="pt")
    probe = PromptProbe(keep=16)
    with probe.attach(model, tokenizer=processor), torch.no_grad():
        model(**inputs)
    decoded = [processor.tokenizer.decode(item.prompt.instruction_ids) for item in probe.seen]
    assert decoded == ["what color is the circle ?", "how many squares ?"]
    assert [s["instruction"] for s in probe.stats["samples"]] == [
        {"tokens": 6, "located": "template", "text": "what color is the circle ?"},
        {"tokens": 4, "located": "template", "text": "how many squares ?"}]
    assert probe.stats["reads_prompt"] is True
    with probe.attach(model), torch.no_grad():  # no tokenizer: the template's tail " ASSISTANT:" is included
        model(**inputs)
    assert probe.stats["samples"][1]["instruction"] == {"tokens": 6, "located": "after media", "text": None}


def test_a_tokenizer_that_cannot_locate_the_template_is_refused_at_attach():
    with pytest.raises(ValueError, match="cannot tell the instruction from the chat template"):
        PromptProbe(keep=4).attach(tiny_model("llava"), tokenizer=object())


def test_every_image_of_a_sample_sees_the_same_instruction_as_llm_input_embeddings():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4], [6, ("img", 1), 2, ("img", 2), QUESTION_A]], side="left")
    probe = PromptProbe(keep=4)
    with probe.attach(model), torch.no_grad():
        model(**inputs)
    first, second, third = probe.seen
    assert second.prompt is third.prompt and first.prompt is not second.prompt
    assert second.prompt.instruction_ids.tolist() == QUESTION_A[1]
    assert first.prompt.located == "after media" and first.prompt.instruction.sum() == 4
    table = model.get_input_embeddings()
    assert torch.equal(second.prompt.embeds, table(second.prompt.ids))
    assert (second.prompt.ids != tiny.IMAGE_TOKEN).all() and (second.prompt.ids != tiny.PAD).all()


def test_a_method_that_does_not_read_the_prompt_is_given_none(monkeypatch):
    model = tiny_model("llava")
    cls = mmprune.METHODS["divprune"]
    seen = record_selects(monkeypatch, cls)
    pruner = cls(keep=4)
    with pruner.attach(model, tokenizer=qwen_style_tokenizer()), torch.no_grad():  # the tokenizer is not even read
        model(**tiny.batch("llava", [[3, ("img", 0), QUESTION_A]]))
    assert seen[0][0].prompt is None
    assert "reads_prompt" not in pruner.stats and "instruction" not in pruner.stats["samples"][0]


# Recoverable's counts come from outlier tests over neighbourhoods of 20 tokens; on a 16-token image nothing stands out
# with the defaults, so the question would only change its merged embeddings, not which slots stay
QUESTION_PARAMS = {"recoverable": dict(visual_lof_neighbours=3, text_lof_neighbours=2)}


def pruner_for(method: str, **params) -> mmprune.Pruner:
    return mmprune.get(method, keep=keep_for(method), **PROMPT_OPTIONS.get(method, {}), **params)


def kept_for(model, family: str, method: str, question) -> list:
    pruner = pruner_for(method, **QUESTION_PARAMS.get(method, {}))
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(family, [[3, ("img", 0), question]]))
    return final_kept(pruner.stats)


@pytest.mark.parametrize("method", TEXT_GUIDED)
def test_changing_only_the_question_changes_a_text_guided_selection(method):
    model = tiny_model("llava")
    assert kept_for(model, "llava", method, QUESTION_A) != kept_for(model, "llava", method, QUESTION_B)
    pruner = pruner_for(method)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch("llava", [[3, ("img", 0), QUESTION_A]]))
    assert pruner.stats["reads_prompt"] is True


@pytest.mark.parametrize("method", VISION_ONLY)
def test_changing_only_the_question_leaves_a_vision_only_selection(method):
    model = tiny_model("llava")
    kept = []
    for question in (QUESTION_A, QUESTION_B):
        pruner = mmprune.get(method, keep=keep_for(method))  # the default options, which read no prompt
        with pruner.attach(model), torch.no_grad():
            model(**tiny.batch("llava", [[3, ("img", 0), question]]))
        kept.append(final_kept(pruner.stats))
        assert "reads_prompt" not in pruner.stats
    assert kept[0] == kept[1]


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", TEXT_GUIDED)
def test_a_batch_of_different_questions_equals_each_alone(family_name, method):
    """Three prompts, different questions, one with two images: each sample's kept sets and greedy tokens as alone."""
    model = tiny_model(family_name)
    samples = [[3, ("img", 0), QUESTION_A], [6, ("img", 1), 2, ("img", 2), QUESTION_B], [1, ("img", 3), 9]]
    pruner = pruner_for(method)
    with pruner.attach(model), torch.no_grad():
        batch = model.generate(**tiny.batch(family_name, samples), max_new_tokens=3, do_sample=False)
        batch_kept = final_kept(pruner.stats)
        for i, sample in enumerate(samples):
            alone = model.generate(**tiny.batch(family_name, [sample]), max_new_tokens=3, do_sample=False)
            assert final_kept(pruner.stats)[0] == batch_kept[i]
            assert torch.equal(alone[0, -3:], batch[i, -3:])
