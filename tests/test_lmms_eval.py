"""lmms-eval integration: ``--model mmprune`` through lmms-eval's own entry point, evaluator and command line, offline
on the shipped model and the synthetic task (``make lmms-eval`` installs lmms-eval; without it this file skips)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make lmms-eval installs it)")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

import mmprune  # noqa: E402
from mmprune.bench.accuracy import evaluate  # noqa: E402
from mmprune.data import synthetic  # noqa: E402
from mmprune.integrations.lmms_eval import MMPrune  # noqa: E402
from mmprune.integrations.lmms_eval_task import write_task  # noqa: E402
from mmprune.zoo import load_shipped  # noqa: E402

N = 20
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    saved = {key: os.environ.get(key) for key in [*OFFLINE, "HF_HOME"]}
    os.environ.update(OFFLINE, HF_HOME=str(tmp_path_factory.mktemp("hf_home")))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    write_task(out, n=N, seed=0)
    return out


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def questions():
    return synthetic.generate(N, seed=0)


def run_harness(task_dir, **model_args) -> dict:
    model = MMPrune(device="cpu", dtype="float32", batch_size=4, **model_args)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=model, tasks=["mmprune_synth"], task_manager=manager, limit=N, log_samples=True)
    samples = sorted(out["samples"]["mmprune_synth"], key=lambda s: s["doc_id"])
    return {"answers": [s["filtered_resps"][0] for s in samples], "doc_ids": [s["doc_id"] for s in samples],
            "accuracy": out["results"]["mmprune_synth"]["exact_match,none"], "throughput": out["throughput"]}


def test_entry_point_resolves_the_model_name():
    from lmms_eval.models import get_model

    assert get_model("mmprune") is MMPrune


@pytest.mark.parametrize(("method", "params", "into_llm"), [
    ("none", {}, 144),
    ("fastv", {"keep": 16}, 144),  # in-LLM: every token enters, 16 leave at layer K
    ("visionzip", {"keep": 16}, 16),  # pre-LLM
])
def test_answers_and_tokens_equal_mmprune_bench(method, params, into_llm, task_dir, shipped, questions):
    got = run_harness(task_dir, method=method, **params)
    pruner = mmprune.get(method, **params) if method != "none" else None
    reference = evaluate(*shipped, questions, pruner, batch_size=4)
    assert got["doc_ids"] == list(range(N))
    assert got["answers"] == reference["answers"]
    assert got["accuracy"] == pytest.approx(reference["accuracy"])
    throughput = got["throughput"]
    after = 144 if method == "none" else 16
    assert throughput["avg_mmprune_visual_tokens_before"] == 144
    assert throughput["avg_mmprune_visual_tokens_llm_input"] == into_llm
    assert throughput["avg_mmprune_visual_tokens_after"] == after
    if pruner is not None:  # the method's own per-sample figures, averaged
        stats = reference["sample_stats"]
        assert throughput["avg_mmprune_equivalent_tokens"] == pytest.approx(
            sum(s["equivalent_tokens"] for s in stats) / N)
        assert all(s["visual_tokens_after"] == 16 for s in stats)
    else:
        assert throughput["avg_mmprune_equivalent_tokens"] == 144 and throughput["avg_mmprune_selection_ms"] == 0


def test_keep_everything_is_the_stock_model_and_stats_are_written_per_batch(task_dir, tmp_path):
    stats_file = tmp_path / "stats.jsonl"
    everything = run_harness(task_dir, method="fastv", keep=1.0, stats_out=str(stats_file))
    stock = run_harness(task_dir, method="none")
    assert everything["answers"] == stock["answers"]
    lines = [json.loads(line) for line in stats_file.read_text().splitlines()]
    assert len(lines) == N // 4
    assert sorted(d for line in lines for d in line["doc_ids"]) == list(range(N))
    assert all(line["method"] == "fastv" and len(line["stats"]["samples"]) == 4 for line in lines)
    assert all(len(kept[0]) == 144 for line in lines for kept in line["kept"])


@pytest.mark.parametrize(("args", "message"), [
    ({"method": "fastvv"}, "unknown method 'fastvv' (did you mean 'fastv'"),
    ({"method": "fastv", "keep": 0}, "keep"),
    ({"method": "fastv", "layer": "[2"}, "layer"),
    ({"method": "none", "keep": 1}, "keep must be 1.0"),
    ({"method": "fastv", "batch_size": "auto"}, "batch_size=auto"),
    ({"method": "fastv", "batch_size": 0}, "batch_size=0: expected a positive integer"),
])
def test_bad_arguments_fail_before_the_model_loads(args, message):
    with pytest.raises(ValueError) as error:
        MMPrune(pretrained="/no/such/model", **args)  # the folder is never reached
    assert message in str(error.value) and "/no/such/model" not in str(error.value)


def test_unsupported_model_and_model_dependent_values_fail_at_construction(tmp_path):
    from mmprune.zoo.tiny_random import build_tiny_llava

    folder = build_tiny_llava(tmp_path / "llava", image_size=32, patch_size=8)
    with pytest.raises(ValueError, match="no such folder"):
        MMPrune(pretrained=str(tmp_path / "absent"), method="fastv", keep=4)
    with pytest.raises(ValueError, match="layer"):
        MMPrune(pretrained=str(folder), method="fastv", keep=4, layer=99)  # the tiny model has 4 layers


def test_an_unsupported_model_fails_at_construction(monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from mmprune import loading

    class Unsupported(LlavaForConditionalGeneration):  # a class mmprune has no adapter for
        pass

    def load_unsupported(*args, **kwargs):
        model, processor = load_shipped()
        model.__class__ = Unsupported
        return model, processor

    monkeypatch.setattr(loading, "load", load_unsupported)
    with pytest.raises(ValueError, match="Unsupported is not a supported model; supported families: "):
        MMPrune(method="fastv", keep=16)


def test_video_requests_are_batched_like_single_ones(tmp_path):
    """A tiny Qwen2-VL (no processor: it needs torchvision) answers chat messages carrying videos: a batch of two
    gives each request's answer and token counts alone."""
    import numpy as np
    from PIL import Image

    from mmprune.zoo.tiny_random import build_tiny_qwen2_vl

    folder = build_tiny_qwen2_vl(tmp_path / "qwen")
    rng = np.random.default_rng(0)
    clips = [[Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)] for n in (4, 2)]
    docs = [{"frames": clip, "question": q} for clip, q in zip(clips, ("what is it", "is it red"))]

    def messages(doc):
        return [{"role": "user", "content": [{"type": "video", "url": doc["frames"]},
                                             {"type": "text", "text": doc["question"]}]}]

    def requests(model, ids):
        model.task_dict = {"clips": {"test": docs}}
        gen = {"max_new_tokens": 3, "until": ["\n\n"]}
        return [Instance("generate_until", ("", messages, gen, i, "clips", "test"), i,
                         metadata={"task": "clips", "doc_id": i, "repeats": 1}) for i in ids]

    batched = MMPrune(pretrained=str(folder), method="evs", keep=0.75, device="cpu", batch_size=2)
    together = [r.text for r in batched.generate_until(requests(batched, [0, 1]))]
    alone = MMPrune(pretrained=str(folder), method="evs", keep=0.75, device="cpu", batch_size=1)
    assert together == [r.text for r in alone.generate_until(requests(alone, [0, 1]))]
    texts, _, stats = batched.answer([r.args for r in requests(batched, [0, 1])])
    assert texts == together
    assert [s["visual_tokens_before"] for s in stats["samples"]] == [32, 16]  # 4 frames -> 2 grids of 16, 2 -> 1
    assert [s["visual_tokens_after"] for s in stats["samples"]] == [24, 16]  # 0.75 of 32; the lone grid stays whole


def test_command_line_writes_the_results_file(task_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mmprune",
           "--model_args", "pretrained=" + str(mmprune.zoo.SHIPPED_MODEL) + ",method=visionzip,keep=16,device=cpu",
           "--tasks", "mmprune_synth", "--include_path", str(task_dir), "--limit", "8", "--batch_size", "4",
           "--output_path", str(out), "--verbosity", "DEBUG"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # lmms-eval can exit 0 after a failed evaluation: the results file is the proof
    files = list(out.rglob("*_results.json"))
    assert len(files) == 1, done.stderr[-2000:]
    result = json.loads(files[0].read_text())
    assert 0 <= result["results"]["mmprune_synth"]["exact_match,none"] <= 1
    throughput = result["throughput"]
    assert throughput["avg_mmprune_visual_tokens_before"] == 144
    assert throughput["avg_mmprune_visual_tokens_llm_input"] == throughput["avg_mmprune_visual_tokens_after"] == 16


def test_the_tested_version_is_pinned_everywhere_and_others_warn():
    from pathlib import Path

    from mmprune.integrations.lmms_eval import TESTED_LMMS_EVAL, check_lmms_eval_version
    from mmprune.upstream import UpstreamVersionWarning

    root = Path(__file__).parent.parent
    assert f'"lmms-eval=={TESTED_LMMS_EVAL}"' in (root / "pyproject.toml").read_text()
    assert f"LMMS_EVAL ?= lmms-eval=={TESTED_LMMS_EVAL}\n" in (root / "Makefile").read_text()
    assert check_lmms_eval_version()  # CI installs the tested one
    with pytest.warns(UpstreamVersionWarning, match="tested with lmms-eval 0.7.3 and 0.8.0 is installed"):
        assert not check_lmms_eval_version("0.8.0")


def test_a_request_of_another_layout_is_refused(task_dir):
    model = MMPrune(method="none", device="cpu")
    request = Instance("generate_until", ("", {}, 0, "mmprune_synth", "test"), 0,
                       metadata={"task": "mmprune_synth", "doc_id": 0, "repeats": 1})
    with pytest.raises(RuntimeError, match=r"not \(context, doc_to_messages, gen_kwargs, doc_id, task, split\)"):
        model.generate_until([request])
