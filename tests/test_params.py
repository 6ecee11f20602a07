"""Every hyper-parameter of every method is checked at ``mmprune.get`` (type and range), depth-dependent values at
attach; names are looked up case-insensitively with suggestions; attach works with and without ``with``."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny
from mmprune.methods.params import Bool, Check, Choice, Float, Instance, Int, Layers

DECLARED = [(name, f.name, f.metadata["check"]) for name, cls in sorted(mmprune.METHODS.items())
            for f in fields(cls) if f.init and "check" in f.metadata]


OBJECT = object()


def wrong_type(check: Check):
    if isinstance(check, (Int, Layers)):
        return "8,16" if isinstance(check, Layers) else 1.5
    if isinstance(check, (Float, Bool)):
        return "a"
    if isinstance(check, Choice):
        return 3
    if isinstance(check, Instance):
        return "a"  # a name, not the object itself
    raise AssertionError(f"no wrong-type value for {check}")


def out_of_range(check: Check):
    if isinstance(check, Int):
        return check.low - 1 if check.low is not None else check.high + 1
    if isinstance(check, Float):
        return check.high + 1 if math.isfinite(check.high) else check.low - 1
    if isinstance(check, Choice):
        return "no-such-option"
    if isinstance(check, Layers):
        return [8, 4]
    if isinstance(check, Bool):
        return 1  # an int is not a bool
    if isinstance(check, Instance):
        return OBJECT  # an object without the attributes
    raise AssertionError(f"no out-of-range value for {check}")


def test_every_method_declares_its_hyper_parameters():
    declared = {(name, field) for name, field, _ in DECLARED}
    for name, cls in mmprune.METHODS.items():
        for f in fields(cls):
            if f.init and f.name not in ("keep", "keep_audio", "positions"):  # validated by the base class
                assert (name, f.name) in declared, f"{name}.{f.name} has no declared check"


@pytest.mark.parametrize(("method", "field", "check"), DECLARED, ids=[f"{m}.{f}" for m, f, _ in DECLARED])
@pytest.mark.parametrize("kind", ["wrong type", "out of range"])
def test_a_bad_value_fails_at_get_naming_field_value_and_what_is_allowed(method, field, check, kind):
    value = wrong_type(check) if kind == "wrong type" else out_of_range(check)
    with pytest.raises(ValueError) as err:
        mmprune.get(method, **{field: value})
    assert str(err.value) == f"{method}: {field}={value!r} is not valid: expected {check.describe()}"


@pytest.mark.parametrize(("method", "field", "check"), DECLARED, ids=[f"{m}.{f}" for m, f, _ in DECLARED])
def test_the_default_and_none_where_optional_are_accepted(method, field, check):
    default = next(f.default for f in fields(mmprune.METHODS[method]) if f.name == field)
    assert getattr(mmprune.get(method, **{field: default}), field) == default
    if check.optional:
        assert getattr(mmprune.get(method, **{field: None}), field) is None


def test_an_int_for_a_float_field_is_stored_as_a_float():
    pruner = mmprune.get("pyramiddrop", lam=1)
    assert pruner.lam == 1.0 and isinstance(pruner.lam, float)


@pytest.mark.parametrize(("method", "params", "message"), [
    ("pyramiddrop", {"layers": [100]}, r"pyramiddrop: layers=\[100\] is beyond the model: layer 100 is not inside "
                                       r"its 4-layer language model \(expected layers in 1\.\.3\)"),
    ("feather", {"layers": [1, 9]}, r"layer 9 is not inside its 4-layer"),
    ("fastv", {"layer": 4}, r"fastv: layer=4 is beyond the model: its language model has 4 layers, so expected 1\.\.3"),
    ("dart", {"layer": 7}, r"dart: layer=7 is beyond the model"),
    ("todre", {"drop_layer": 4}, r"todre: drop_layer=4 is beyond the model"),
])
def test_depth_dependent_values_fail_at_attach(method, params, message):
    pruner = mmprune.get(method, keep=0.5, **params)  # valid on its own
    with pytest.raises(ValueError, match=message):
        pruner.attach(tiny_model("llava"))
    # nothing stays attached after the refusal
    mmprune.get("random").attach(tiny_model("llava")).detach()


@pytest.mark.parametrize(("given", "expected"), [("FastV", "fastv"), ("VISIONZIP", "visionzip"), ("DivPrune", "divprune")])
def test_method_names_are_case_insensitive(given, expected):
    assert mmprune.get(given).name == expected


@pytest.mark.parametrize(("given", "suggestion"), [("visonzip", "visionzip"), ("fast_v", "fastv"), ("pyramid", "pyramiddrop")])
def test_a_misspelt_method_gets_a_suggestion(given, suggestion):
    with pytest.raises(ValueError, match=rf"unknown method '{given}' \(did you mean '{suggestion}'"):
        mmprune.get(given)


def test_a_misspelt_parameter_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"todre: unknown parameter 'migration_treshold' \(did you mean "
                                         r"'migration_threshold'\?\); its parameters are keep, positions"):
        mmprune.get("todre", migration_treshold=0.1)
    with pytest.raises(ValueError, match=r"todre: migration_threshold='a' is not valid: expected a number in \(0, 1\)"):
        mmprune.get("todre", migration_threshold="a")


def test_attach_without_with_prunes_until_detach():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4]])
    with torch.no_grad():
        unpruned = model(**inputs).logits
    pruner = mmprune.get("fastervlm", keep=4)
    session = pruner.attach(model)  # long-lived, as a serving loop would hold it
    try:
        assert session.attached
        with torch.no_grad():
            pruned = model(**inputs).logits
        assert pruned.shape[1] == unpruned.shape[1] - 12 and pruner.stats["samples"][0]["visual_tokens_after"] == 4
    finally:
        session.detach()
    session.detach()  # a second detach does nothing
    assert not session.attached
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, unpruned)


def test_labels_are_refused_and_output_index_maps_the_pruned_positions():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4], [1, ("img", 1), 2]])
    with mmprune.get("uniform", keep=4).attach(model) as session, torch.no_grad():
        with pytest.raises(ValueError, match="labels are not supported while a pruner is attached.*output_index"):
            model(**inputs, labels=inputs["input_ids"])
        out = model(**inputs)
        index = session.output_index()
    assert index.shape == out.logits.shape[:2]
    ids = inputs["input_ids"]
    # every text token survives, in order; the kept image tokens are uniform's grid; padding is -1
    for sample, kept in enumerate(mmprune.engine.session.final_kept(session.pruner.stats)):
        row = index[sample][index[sample] >= 0]
        image = (ids[sample] == tiny.IMAGE_TOKEN).nonzero().squeeze(1)
        text = (inputs["attention_mask"][sample].bool() & (ids[sample] != tiny.IMAGE_TOKEN)).nonzero().squeeze(1)
        assert row.tolist() == sorted(text.tolist() + image[kept[0]].tolist())
    assert (index == -1).sum() == (inputs["attention_mask"] == 0).sum()


def test_output_index_follows_in_llm_stages():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4]])
    with mmprune.get("fastv", keep=4).attach(model) as session, torch.no_grad():
        out = model(**inputs)
        kept = mmprune.engine.session.final_kept(session.pruner.stats)[0][0]
    index = session.output_index()[0]
    assert out.logits.shape[1] == index.numel() == 3 + 4 + 4
    assert index.tolist() == [0, 1, 2] + [3 + k for k in kept] + [19, 20, 21, 22]


def test_a_compiled_model_is_refused_with_what_to_do():
    compiled = torch.compile(tiny.llava(seed=3))
    with pytest.raises(ValueError, match=r"compiled with torch.compile: attach to the uncompiled model \(model._orig_mod"):
        mmprune.get("random").attach(compiled)
