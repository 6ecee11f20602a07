"""Nothing passes through silently: inputs and decoding modes the engine does not prune are refused, early, with
one clear line; what it does handle keeps working next to them."""

from __future__ import annotations

import pytest
import torch
from conftest import keep_for, tiny_model
from transformers import StaticCache

import mmprune
import tiny
from mmprune import upstream

ONE_IMAGE = [[3, ("img", 0), 4]]
QWEN = ["qwen2_vl", "qwen2_5_vl"]
# one pre-LLM, one single-stage in-LLM, one hybrid: the refusals sit in the engine, before any method runs
REPRESENTATIVE = ["fastervlm", "fastv", "visiondrop"]
GEN = dict(max_new_tokens=2, do_sample=False)


def video_inputs(family: str, with_image: bool) -> dict:
    """A Qwen prompt with one video (2 temporal patches of 8x8 patches: 2 x 4 x 4 = 32 tokens), after an image."""
    g = torch.Generator().manual_seed(7)
    inputs = tiny.batch(family, [[3, ("img", 0), 2] if with_image else [3]])
    video = [tiny.VISION_START] + [tiny.VIDEO_TOKEN] * 32 + [tiny.VISION_END] + [5, 6]
    ids = torch.cat([inputs["input_ids"], torch.tensor([video])], dim=1)
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=(ids == tiny.IMAGE_TOKEN).int() + 2 * (ids == tiny.VIDEO_TOKEN).int(),
                  pixel_values_videos=torch.randn(2 * 8 * 8, 3 * 2 * 4 * 4, generator=g),
                  video_grid_thw=torch.tensor([[2, 8, 8]]))
    if not with_image:
        inputs.pop("pixel_values", None)
        inputs.pop("image_grid_thw", None)
    return inputs


@pytest.mark.parametrize("with_image", [False, True], ids=["video", "image+video"])
@pytest.mark.parametrize("method", ["fastervlm", "visiondrop", "feather"])
@pytest.mark.parametrize("family", QWEN)
def test_a_method_without_video_support_refuses_a_video(family, method, with_image):
    model = tiny_model(family)
    inputs = video_inputs(family, with_image)
    with torch.no_grad():
        reference = model.generate(**inputs, **GEN)  # the unpatched model runs these inputs
    pruner = mmprune.get(method, keep=keep_for(method))
    with pruner.attach(model):
        for run in (lambda: model.generate(**inputs, **GEN), lambda: model(**inputs)):
            with pytest.raises(ValueError, match=rf"{method} does not prune video \(it handles image\); methods "
                                                 r"that do: .*evs.*fastv"), torch.no_grad():
                run()
        assert pruner.stats is None
        # images alone still prune on the same attachment
        with torch.no_grad():
            model.generate(**tiny.batch(family, ONE_IMAGE), **GEN)
        sample = pruner.stats["samples"][0]
        assert sample["visual_tokens_after"] < sample["visual_tokens_before"]
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **GEN), reference)  # detached: untouched


def test_a_modality_the_family_does_not_handle_is_refused(monkeypatch):
    """What the engine cannot place (here: videos, if the Qwen adapter did not declare them) is refused before the
    encoder runs, naming the family and what it supports."""
    from mmprune.models.qwen2_vl import Qwen2VLAdapter

    monkeypatch.setattr(Qwen2VLAdapter, "modalities", ("image",))
    model = tiny_model("qwen2_vl")
    inputs = video_inputs("qwen2_vl", with_image=True)
    with mmprune.get("fastv", keep=0.5).attach(model), torch.no_grad():
        with pytest.raises(ValueError, match=r"carries video, which mmprune does not prune on qwen2-vl yet "
                                             r"\(supported: image\)"):
            model.generate(**inputs, **GEN)


def test_generate_without_a_cache_is_refused(family):
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        with pytest.raises(ValueError, match=r"use_cache=False .* not supported with a pruner attached"):
            model.generate(**inputs, **GEN, use_cache=False)
        assert pruner.stats is None
        # a single forward without a cache is one pruned prefill, and still allowed
        model(**inputs, use_cache=False)
        assert pruner.stats["samples"][0]["visual_tokens_after"] == mmprune.resolve_keep(
            0.25, tiny.tokens_per_image(family, 0))


def test_generation_config_without_a_cache_is_refused_too():
    model = tiny_model("llava")
    model.generation_config.use_cache = False
    try:
        with mmprune.get("fastv", keep=0.5).attach(model), torch.no_grad():
            with pytest.raises(ValueError, match="use_cache=False"):
                model.generate(**tiny.batch("llava", ONE_IMAGE), **GEN)
    finally:
        model.generation_config.use_cache = True


def test_the_language_model_refuses_an_uncached_generation_step_if_generate_was_not_told(monkeypatch):
    """Belt and braces: a generate() whose settings the early check cannot see still reaches the language model
    with use_cache=False and no cache; the prefill hook refuses it."""
    model = tiny_model("llava")
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model) as session, torch.no_grad():
        monkeypatch.setattr(session, "_check_generation", lambda kwargs: None)
        with pytest.raises(ValueError, match=r"generate\(use_cache=False\) is not supported"):
            model.generate(**tiny.batch("llava", ONE_IMAGE), **GEN, use_cache=False)


@pytest.mark.parametrize(("setting", "message"), [
    (dict(num_beams=2), r"beam search \(num_beams=2\)"),
    (dict(num_return_sequences=2, do_sample=True), "num_return_sequences=2"),
    (dict(prompt_lookup_num_tokens=2), "assisted/speculative decoding"),
    (dict(cache_implementation="static"), "static caches are not supported; use the default dynamic cache"),
])
def test_decoding_modes_the_engine_cannot_follow_are_refused_before_running(setting, message):
    model = tiny_model("llava")
    pruner = mmprune.get("random", keep=0.25)
    calls = []
    with pruner.attach(model), torch.no_grad():
        handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            with pytest.raises(ValueError, match=message):
                model.generate(**tiny.batch("llava", ONE_IMAGE), **{**GEN, **setting})
        finally:
            handle.remove()
    assert calls == [] and pruner.stats is None


def test_a_static_cache_passed_in_is_refused():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    cache = StaticCache(config=model.config.text_config, max_cache_len=64)
    with mmprune.get("fastervlm", keep=0.25).attach(model), torch.no_grad():
        with pytest.raises(ValueError, match="StaticCache is not supported.*default dynamic cache"):
            model(**inputs, **{upstream.cache_argument(model.forward): cache})


@pytest.mark.parametrize("second", ["same", "other"])
def test_a_second_attachment_is_refused_and_the_first_keeps_working(second):
    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    first = mmprune.get("fastervlm", keep=0.25)
    with torch.no_grad():
        unpruned = model(**inputs).logits
    with first.attach(model), torch.no_grad():
        pruned = model(**inputs).logits
        other = first if second == "same" else mmprune.get("fastv", keep=0.5)
        with pytest.raises(ValueError, match="fastervlm is already attached to this model.*detach the first"):
            with other.attach(model):
                pass
        assert torch.equal(model(**inputs).logits, pruned)
        assert first.stats["samples"][0]["visual_tokens_after"] == 4
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, unpruned)
    # after detaching, another method attaches normally
    with mmprune.get("fastv", keep=0.5).attach(model), torch.no_grad():
        model(**inputs)


def test_a_prepared_four_d_mask_is_refused():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    length = inputs["input_ids"].shape[1]
    inputs["attention_mask"] = torch.ones(1, 1, length, length).tril()
    with mmprune.get("fastervlm", keep=0.25).attach(model), torch.no_grad():
        with pytest.raises(ValueError, match="needs the 2-D .* attention mask"):
            model(**inputs)
