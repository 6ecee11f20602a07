"""Contract tests: every assumption mmprune makes about transformers internals, checked on the installed release.

Each check in ``mmprune.upstream.ASSUMPTIONS`` runs on the tiny model of each family; a release that breaks one
fails here with the assumption's name and the installed version, not with a shape error inside SDPA.
"""

from __future__ import annotations

import copy
import types
import re
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, decoder, tiny_model

import mmprune
import tiny
from mmprune import upstream
from mmprune.models import adapter_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("assumption", upstream.ASSUMPTIONS, ids=lambda a: a.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_assumption_holds_on_installed_transformers(assumption, family):
    adapter = adapter_for(tiny_model(family))
    if not assumption.applies(adapter.family):
        pytest.skip(f"{assumption.name} is about {', '.join(assumption.families)}")
    try:
        assumption.check(adapter)
    except upstream.UpstreamMismatch as exc:
        pytest.fail(f"transformers {transformers.__version__}: {exc}")


def test_cache_argument_is_the_name_the_installed_forward_takes(family):
    lm = decoder(tiny_model(family))
    name = upstream.cache_argument(lm.forward)
    seen = []
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.append(sorted(k)), with_kwargs=True)
    try:
        with torch.no_grad():
            tiny_model(family)(**tiny.batch(family, [[3, ("img", 0), 4]]), use_cache=True)
    finally:
        handle.remove()
    assert name in seen[0], f"transformers {transformers.__version__} passes {seen[0]}, not {name!r}"


def test_causal_mask_for_a_shortened_layer_matches_its_cache():
    """The mask helper passes the cache under the installed name and honours layer_idx: a layer whose cache holds
    fewer tokens gets a mask of that length."""
    model = tiny_model("llava")
    lm = model.model.language_model
    cache = upstream.new_cache(lm.config)
    k = torch.zeros(1, 2, 5, 8)
    cache.update(k, k, 0)
    cache.update(k[:, :, :3], k[:, :, :3], 1)
    hidden = torch.zeros(1, 1, 32)
    config = copy.deepcopy(lm.config)
    config._attn_implementation = "eager"  # SDPA may skip the mask altogether
    eager_lm = types.SimpleNamespace(config=config, layers=lm.layers)
    masks = [upstream.layer_mask(eager_lm, hidden, torch.ones(1, length + 1, dtype=torch.bool), cache, layer)
             for layer, length in ((0, 5), (1, 3))]
    assert [m.shape[-1] for m in masks] == [6, 4]


def test_a_broken_assumption_names_itself_and_the_version():
    def forward(hidden_states, attention_mask=None, kv=None):  # a release that renamed the cache again
        return hidden_states

    with pytest.raises(upstream.UpstreamMismatch) as err:
        upstream.cache_argument(forward)
    message = str(err.value)
    assert f"transformers {transformers.__version__}" in message
    assert "`cache` or `past_key_values`" in message and "hidden_states, attention_mask, kv" in message
    assert upstream.TESTED_TRANSFORMERS in message


def test_attach_refuses_a_model_that_breaks_an_assumption():
    model = tiny.llava(seed=5)
    del model.model.language_model.layers[0].self_attn.scaling
    with pytest.raises(upstream.UpstreamMismatch, match="decoder layers have input_layernorm.*scaling"):
        with mmprune.get("fastv", keep=0.5).attach(model):
            pass


def test_pyproject_declares_the_tested_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [d for d in project["dependencies"] if re.match(r"transformers\b", d)]
    assert declared == [f"transformers{upstream.TESTED_TRANSFORMERS}"]
    assert upstream.in_tested_range(upstream.OLDEST_TESTED)
    assert f">={upstream.OLDEST_TESTED}," in upstream.TESTED_TRANSFORMERS


def test_installed_transformers_is_in_the_tested_range():
    assert upstream.in_tested_range(), (f"transformers {transformers.__version__} is outside "
                                        f"{upstream.TESTED_TRANSFORMERS}: the suite runs on the tested range only")


@pytest.mark.parametrize(("version", "inside"), [("5.13.0", False), ("5.14.0", True), ("5.24.0", True),
                                                 ("5.24.3", True), ("5.25.0", False), ("6.0.0", False)])
def test_a_release_outside_the_range_warns_once_naming_the_range(version, inside):
    upstream.check_version.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert upstream.check_version(version) is inside
        upstream.check_version(version)
    upstream.check_version.cache_clear()
    messages = [str(w.message) for w in caught if issubclass(w.category, upstream.UpstreamVersionWarning)]
    if inside:
        assert messages == []
    else:
        assert len(messages) == 1
        assert f"transformers {version} is installed" in messages[0] and upstream.TESTED_TRANSFORMERS in messages[0]


def test_attach_warns_on_an_untested_release(monkeypatch):
    upstream.check_version.cache_clear()
    monkeypatch.setattr(transformers, "__version__", "9.0.0")
    try:
        with pytest.warns(upstream.UpstreamVersionWarning, match=r"transformers 9\.0\.0 is installed"):
            with mmprune.get("random").attach(tiny_model("llava")):
                pass
    finally:
        upstream.check_version.cache_clear()


def test_old_mrope_tables_are_combined_like_the_attention_does():
    """Before 5.17 Qwen2-VL's rotary embedding returned (3, B, L, d) tables; combining them by mrope_section must
    give what the model applies: sections [2, 1, 1] (x2) take t, h, w, t, h, w in turn."""
    lm = tiny_model("qwen2_vl").model.language_model
    cos = torch.stack([torch.full((1, 5, 8), float(row)) for row in range(3)])
    combined, _ = upstream.rope_tables(lm, cos, cos)
    assert combined.shape == (1, 5, 8)
    assert combined[0, 0].tolist() == [0, 0, 1, 2, 0, 0, 1, 2]
    flat = torch.randn(1, 5, 8)
    assert upstream.rope_tables(lm, flat, flat)[0] is flat
