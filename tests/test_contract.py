"""The public contract: registry, budgets, and every bad input's error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import mmprune
import tiny


def test_available_is_sorted_and_get_builds_dataclasses():
    names = mmprune.available()
    assert names == sorted(names)
    assert {"random", "uniform", "pool", "fastervlm", "visionzip", "divprune"} <= set(names)
    for name in names:
        if name == "none":
            assert mmprune.get(name).keep == 1.0
            with pytest.raises(ValueError, match="none keeps every visual token: keep must be 1.0, got 64"):
                mmprune.get(name, keep=64)
            continue
        pruner = mmprune.get(name, keep=64)
        assert dataclasses.is_dataclass(pruner) and pruner.name == name and pruner.keep == 64
        assert type(pruner).__doc__ and pruner.summary and pruner.stage in ("pre-llm", "in-llm", "pre+in-llm")
        assert pruner.stats is None


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown method 'fastv2'.*divprune"):
        mmprune.get("fastv2")


def test_unknown_parameter_names_the_allowed_ones():
    with pytest.raises(ValueError, match="seed"):
        mmprune.get("random", sed=3)


@pytest.mark.parametrize("keep", [0, -3, 0.0, -0.5, 1.5, float("nan"), "64", None, True, [64]])
def test_bad_keep_raises_naming_the_value_and_range(keep):
    with pytest.raises(ValueError) as err:
        mmprune.get("fastervlm", keep=keep)
    assert repr(keep) in str(err.value) and "(0, 1]" in str(err.value)


@pytest.mark.parametrize(("keep", "n", "expected"), [(0.25, 576, 144), (64, 576, 64), (1.0, 576, 576),
                                                     (0.111, 576, 64), (0.098, 576, 56), (1, 16, 1)])
def test_keep_resolves_to_a_count(keep, n, expected):
    assert mmprune.resolve_keep(keep, n) == expected


def test_fraction_that_keeps_nothing_is_an_error():
    with pytest.raises(ValueError, match="keeps 0 of the image's 16"):
        mmprune.resolve_keep(0.01, 16)


def test_more_tokens_than_the_image_has_is_an_error_at_forward():
    model = tiny_model("llava")
    pruner = mmprune.get("fastervlm", keep=17)
    with pruner.attach(model), pytest.raises(ValueError, match=r"keep=17 .* \(16 visual tokens\)"):
        with torch.no_grad():
            model(**tiny.batch("llava", [[3, ("img", 0), 4]]))


def test_bad_position_policy():
    with pytest.raises(ValueError, match="positions='rope'.*renumber"):
        mmprune.get("random", positions="rope")


def test_renumber_is_refused_for_mrope_models():
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="renumber.*M-RoPE"):
        with mmprune.get("random", positions="renumber").attach(model):
            pass


def test_unsupported_model_lists_the_families():
    model = LlamaForCausalLM(LlamaConfig(**tiny._text()))
    with pytest.raises(ValueError, match="LlamaForCausalLM is not a supported model.*llava.*llava-next.*qwen2-vl"):
        with mmprune.get("random").attach(model):
            pass


def test_inputs_embeds_without_input_ids_is_an_error():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4]])
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with mmprune.get("random").attach(model), pytest.raises(ValueError, match="locates media tokens through input_ids"):
        with torch.no_grad():
            model(inputs_embeds=embeds, **inputs)


def test_visionzip_contextual_must_leave_dominant_tokens():
    model = tiny_model("llava")
    pruner = mmprune.get("visionzip", keep=4, contextual=3)
    with pruner.attach(model), pytest.raises(ValueError, match="contextual <= 2"):
        with torch.no_grad():
            model(**tiny.batch("llava", [[3, ("img", 0), 4]]))
    with pytest.raises(ValueError, match="contextual=-1"):
        mmprune.get("visionzip", contextual=-1)


def test_positions_original_on_llava_keeps_original_ids():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4]])
    seen = []
    pruner = mmprune.get("uniform", keep=4, positions="original")
    with pruner.attach(model), torch.no_grad():
        h = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        h.remove()
    # text 0..2, kept patches 0,2,8,10 at 3+{0,2,8,10}, text 19..22; decoding continues at 23
    assert seen[0][0].tolist() == [0, 1, 2, 3, 5, 11, 13, 19, 20, 21, 22]
    assert seen[1].tolist() == [[23]]
