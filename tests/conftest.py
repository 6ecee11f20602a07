import os
import sys

import pytest
import torch

import mmprune

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

FAMILIES = list(tiny.BUILDERS)
OMNI_FAMILIES = ("qwen2_5_omni", "qwen3_omni")
_models: dict[str, torch.nn.Module] = {}


def omni_supported() -> bool:
    from packaging.version import Version

    from mmprune import upstream

    return Version(upstream.transformers_version()) >= Version(upstream.OMNI_FIRST)


def family_supported(family: str) -> bool:
    """Whether this transformers release has the tiny ``family`` model's classes (the Omni thinkers: from 5.21)."""
    return family not in OMNI_FAMILIES or omni_supported()


def tiny_model(family: str) -> torch.nn.Module:
    if not family_supported(family):
        pytest.skip(f"Qwen2.5-Omni thinkers are supported from transformers {mmprune.upstream.OMNI_FIRST} "
                    "(tests/test_omni.py checks the refusal on older releases)")
    if family not in _models:
        _models[family] = tiny.BUILDERS[family]()
    return _models[family]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def pruning(modality: str) -> list[str]:
    """Registered methods that reduce ``modality``'s tokens (``none`` keeps everything; EVS leaves images whole)."""
    return [m for m, cls in sorted(mmprune.METHODS.items()) if cls.prunes(modality)]


# Stage layers a 4-layer test model can hold, for methods whose default schedule needs a deeper one
TINY_PARAMS = {"seats": dict(layers=[1, 2], late_layer=3)}


def method_for_tiny(method: str, **params) -> mmprune.Pruner:
    """``mmprune.get(method, **params)`` with the stage layers a 4-layer test model can hold."""
    return mmprune.get(method, **{**TINY_PARAMS.get(method, {}), **params})


def keep_for(method: str) -> float:
    """A budget every test model can meet: multi-stage methods average over layers, and every token runs until
    their first stage, so a quarter is out of reach on a 4-layer model."""
    return 0.5 if averages_over_layers(method) else 0.25


def averages_over_layers(method: str) -> bool:
    return (mmprune.METHODS[method].keep_means != "visual tokens kept per image" and method != "todre"
            and not adaptive_count(method))


def adaptive_count(method: str) -> bool:
    """Pre-LLM methods whose data decide how many tokens stay, ``keep`` being the most (SMS's knee)."""
    cls = mmprune.METHODS[method]
    return cls.stage == "pre-llm" and cls.variable_counts


def duplicate_rounds(rest: list[int], h, diverse: int) -> list[int]:
    """VisPruner's duplicate removal written with numpy: while more than ``diverse`` candidates are left, split the
    list into even (A) and odd (B) places, drop the (up to 8) A tokens most similar (``h`` rows, normalised) to a B
    token, and list the other A tokens by descending similarity, then B."""
    import numpy as np

    while len(rest) > diverse:
        even, odd = rest[0::2], rest[1::2]
        drop = min(8, len(rest) - diverse, len(even))
        best = np.array([max(float(h[i] @ h[j]) for j in odd) for i in even])
        rest = [even[i] for i in np.argsort(-best, kind="stable")[drop:]] + odd
    return rest


def record_selects(monkeypatch, cls) -> list:
    """``(tokens, k)`` of every ``select`` call of the pre-LLM method class ``cls`` from now on."""
    seen = []
    original = cls.select
    monkeypatch.setattr(cls, "select", lambda self, tokens, k: seen.append((tokens, k)) or original(self, tokens, k))
    return seen


def not_run_because(method: str, family: str) -> str | None:
    """Why the tiny ``family`` model does not run ``method`` in the method x family tests (None where it does):
    a method restricted to other families (FlowCut: LLaVA-1.5 only), or one that reads decoder attention at a
    linear layer of the 4-layer Qwen3.5. The refusals themselves are tested in the method's and family's tests."""
    families = getattr(mmprune.METHODS.get(method), "families", ())
    if families:
        from mmprune.models import adapter_for

        if adapter_for(tiny_model(family)).family not in families:
            return f"{method} supports {', '.join(families)} only"
    if family == "qwen3_5" and method in SCORES_AT_LINEAR_LAYERS:
        return (f"{method} reads decoder attention at a linear layer of the 4-layer Qwen3.5 (refused): "
                "tests/test_qwen3_5.py checks the refusal and runs it at the attention layers of a deeper one")
    return None


def families_running(method: str) -> list[str]:
    """The tiny families this transformers release supports that run ``method`` (see ``not_run_because``)."""
    return [family for family in FAMILIES if family_supported(family) and not_run_because(method, family) is None]


@pytest.fixture(autouse=True)
def _method_families(request):
    """Skip a method x family case the tiny family does not run (``not_run_because``)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    method, family = params.get("method"), params.get("family") or params.get("family_name")
    if isinstance(method, str) and method in mmprune.METHODS and family in tiny.BUILDERS:
        reason = not_run_because(method, family)
        if reason:
            pytest.skip(reason)


# In-LLM methods whose default schedule reads the attention (queries, keys) of one of layers 0-2 on a 4-layer model:
# the tiny Qwen3.5's linear-attention layers (todre reads them only in its adaptive mode; seats with TINY_PARAMS)
SCORES_AT_LINEAR_LAYERS = ("dart", "fastv", "feather", "pyramiddrop", "seats", "sparsevlm", "visiondrop")


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """A tiny model's decoder: ``model.model.language_model`` (``.text_model`` on Idefics3 / SmolVLM)."""
    return mmprune.upstream.multimodal_decoder(model.model)


def qwen_vision_attention_received(model, inputs, family: str) -> torch.Tensor:
    """``(heads, merged tokens)``: each 2x2-merged token's mean attention received from every patch of the batch's
    first image at a Qwen vision tower's last block (mean over queries, mean over its 4 patches), in the tower's
    token order, from the block's eager attention weights (the family's own ``eager_attention_forward``) recorded
    through a registered attention function (the tower keeps its own implementation otherwise)."""
    import importlib

    from transformers import AttentionInterface

    eager_attention_forward = importlib.import_module(
        f"transformers.models.{family}.modeling_{family}").eager_attention_forward

    records = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        records.append(weights)
        return out, weights

    AttentionInterface.register("mmprune_test_recording", recording)
    visual = model.model.visual
    previous = visual.config._attn_implementation
    visual.config._attn_implementation = "mmprune_test_recording"
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        visual.config._attn_implementation = previous
    weights = records[-1][0]  # (heads, patches, patches)
    return weights.mean(1).reshape(weights.shape[0], -1, 4).mean(-1)
