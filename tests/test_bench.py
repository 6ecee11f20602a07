"""`mmprune bench` on a tiny random LLaVA saved with a real processor: files, columns, stability, failures."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import omni_supported

import mmprune
from mmprune.bench.reference import REFERENCES
from mmprune.bench.sweep import SweepSettings, run_sweep, stability
from mmprune.cli import load, main
from mmprune.data import synthetic
from mmprune.methods.base import PreLLMPruner
from mmprune.registry import METHODS
from mmprune.zoo.tiny_random import build_tiny_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", image_size=32, patch_size=8))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(model_dir)


def test_two_methods_two_budgets_write_every_file(model_dir, tmp_path, capsys):
    assert main(["bench", "--model", model_dir, "--methods", "fastervlm,fastv", "--keep", "8,4",
                 "--data", "synthetic:7", "--batch", "4", "--reps", "1", "--decode-steps", "2",
                 "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    names = {"results.json", "results.csv", "results.md", "retention_vs_tokens.png", "speedup_vs_tokens.png",
             "family_retention.png"}
    assert names <= {p.name for p in tmp_path.iterdir()}
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["keep"]) for r in rows] == [("none", "1.0"), ("random", "8"), ("random", "4"),
                                                        ("pool", "8"), ("pool", "4"), ("fastervlm", "8"),
                                                        ("fastervlm", "4"), ("fastv", "8"), ("fastv", "4")]
    for column in ("accuracy", "retention", "equivalent_tokens", "flops_speedup", "prefill_speedup", "e2e_speedup",
                   "kv_bytes", "selection_share", "stability", "recall", "accuracy:count"):
        assert column in rows[0]
    assert all(r["status"] == "ok" for r in rows)
    by = {(r["method"], r["keep"]): r for r in rows}
    # a random-weight model answers nothing right, so retention is 0/0: reported empty (NaN), never invented
    assert by[("none", "1.0")]["retention"] in ("", "1") and float(by[("none", "1.0")]["flops_speedup"]) == 1.0
    assert float(by[("fastervlm", "4")]["equivalent_tokens"]) == 4.0
    assert float(by[("fastervlm", "4")]["flops_speedup"]) > float(by[("fastervlm", "8")]["flops_speedup"]) > 1
    assert float(by[("fastv", "4")]["kv_bytes"]) < float(by[("none", "1.0")]["kv_bytes"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["questions"] == 7 and len(data["rows"]) == 9
    assert "| fastervlm | 4 |" in (tmp_path / "results.md").read_text()


def test_stability_is_one_for_a_deterministic_method_and_not_for_random_seeds(loaded):
    model, processor = loaded
    samples = synthetic.generate(6, seed=0)
    assert stability(model, processor, samples, mmprune.get("none"), seed=0) == 1.0
    # noise far below what changes a top-k of distinct scores: the same kept sets
    assert stability(model, processor, samples, mmprune.get("uniform", keep=4), seed=0) == 1.0

    from mmprune.bench.sweep import _inputs
    from mmprune.engine.session import final_kept

    inputs = _inputs(processor, samples, model.device)
    kept = []
    for seed in (1, 2):
        pruner = mmprune.get("random", keep=4, seed=seed)
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
        kept.append(final_kept(pruner.stats))
    overlap = [len(set(a[0]) & set(b[0])) / len(set(a[0]) | set(b[0])) for a, b in zip(*kept)]
    assert sum(overlap) / len(overlap) < 1.0


@dataclass
class Broken(PreLLMPruner):
    keep: int | float = 0.5
    name: ClassVar[str] = "broken"
    summary: ClassVar[str] = "raises"

    def select(self, tokens, k):
        raise RuntimeError("this method is broken")


def test_a_failing_method_is_a_failed_row_and_the_sweep_goes_on(loaded, monkeypatch):
    model, processor = loaded
    monkeypatch.setitem(METHODS, "broken", Broken)
    rows = run_sweep(model, processor, synthetic.generate(4, seed=0),
                     SweepSettings(methods=["broken", "uniform"], keeps=[4], batch=4, reps=1, decode_steps=1,
                                   timing_samples=2, stability_samples=2, progress=False))
    status = {r["method"]: r["status"] for r in rows}
    assert status["broken"] == "failed: RuntimeError: this method is broken"
    assert status["uniform"] == "ok" and status["none"] == "ok"


def test_bad_bench_input(model_dir, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    for args, message in ((["--methods", "nope"], "--methods: unknown method 'nope'"),
                          (["--methods", "visonzip"], "did you mean 'visionzip'"),
                          (["--data", "synthetic:x"], "expected synthetic:N"),
                          (["--data", "file.txt"], "expected synthetic:N or a .jsonl file"),
                          (["--keep", "0"], "keep=0 is out of range"),
                          (["--batch", "0"], "--batch 0: expected an int >= 1"),
                          (["--reps", "0"], "--reps 0: expected an int >= 1"),
                          (["--decode-steps", "0"], "--decode-steps 0: expected an int >= 1"),
                          (["--speed", "--batches", "1,0"], "--batches 0: expected an int >= 1"),
                          (["--speed", "--side-by-side", "--batches", "1"], "expected one B >= 2"),
                          (["--speed", "--side-by-side", "--methods", "none"], "at least one method besides none"),
                          (["--speed", "--threads", "0"], "--threads 0: expected an int >= 1"),
                          (["--out", str(a_file)], "is an existing file: expected a folder")):
        argv = ["bench", "--model", model_dir, "--out", str(tmp_path), *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)


def test_bench_exits_nonzero_when_no_requested_row_succeeds(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "broken", Broken)
    assert main(["bench", "--model", model_dir, "--methods", "broken", "--keep", "4", "--data", "synthetic:3",
                 "--batch", "3", "--reps", "1", "--decode-steps", "1", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "no row of broken succeeded" in captured.err
    assert "broken@4" in captured.out  # the files are still written, with the failed row


def test_implausible_timings_are_flagged_and_kept_out_of_the_plot():
    from mmprune.bench.report import markdown, speedup_series
    from mmprune.bench.sweep import flag_noisy_timings

    def row(method, keep, tokens, measured, predicted, e2e=1.0, e2e_predicted=1.0):
        return {"method": method, "keep": keep, "status": "ok", "accuracy": 0.5, "retention": 1.0,
                "visual_tokens_llm_input": tokens, "equivalent_tokens": tokens, "flops_speedup": predicted,
                "prefill_speedup": measured, "e2e_speedup": e2e, "flops_e2e_speedup": e2e_predicted,
                "kv_bytes": 0.0, "selection_share": 0.0, "stability": 1.0, "families": {}}

    rows = [row("none", 1.0, 144, 1.02, 1.0), row("fastv", 0.33, 48, 2.0, 1.9),
            row("fastv", 0.11, 16, 9.0, 2.8), row("dart", 0.11, 16, 2.5, 2.7, e2e=16.4, e2e_predicted=2.1)]
    flag_noisy_timings(rows)
    assert [r["timing_noisy"] for r in rows] == [None, None, "prefill 9.0x where FLOPs predict 2.8x",
                                                 "end-to-end 16.4x where FLOPs predict 2.1x"]
    series, top = speedup_series([r for r in rows if r["method"] != "none"])
    # a flagged row's measured points leave the plot (its run is suspect), its FLOPs prediction stays
    assert series["fastv"][0] == [(48, 2.0)] and series["dart"] == ([], [(16, 2.7)])
    assert top == pytest.approx(1.15 * 2.8)
    text = markdown(rows, {"timing_batch": 8, "batch": 16})
    assert "| 9.00x* |" in text and "* fastv keep=0.11: prefill 9.0x where FLOPs predict 2.8x" in text
    # a reference far from 1x against itself makes every timing suspect
    rows[0]["prefill_speedup"] = 0.79
    flag_noisy_timings(rows)
    assert all("reads 0.79x" in r["timing_noisy"] for r in rows)


def test_family_plot_uses_one_budget_and_names_who_failed_there():
    from mmprune.bench.report import family_budget

    rows = [{"method": "none", "keep": 1.0, "status": "ok", "equivalent_tokens": 144},
            {"method": "fastv", "keep": 0.33, "status": "ok", "equivalent_tokens": 80},
            {"method": "fastv", "keep": 0.11, "status": "ok", "equivalent_tokens": 59},
            {"method": "feather", "keep": 0.33, "status": "ok", "equivalent_tokens": 46},
            {"method": "feather", "keep": 0.11, "status": "failed: ValueError: cannot average 16"}]
    target, at_target, missing = family_budget(rows)
    assert target == 0.11 and list(at_target) == ["fastv"] and missing == ["feather"]


def test_results_name_no_absolute_path_and_the_batches_that_ran(model_dir, tmp_path, capsys):
    assert main(["bench", "--model", model_dir, "--methods", "uniform", "--keep", "4", "--data", "synthetic:3",
                 "--batch", "16", "--reps", "1", "--decode-steps", "1", "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    assert str(tmp_path) not in text and "model llava;" in text
    assert "answered in batches of 3" in text and "a batch of 3 prompts" in text
    assert "questions per family:" in text
    config = json.loads((tmp_path / "out" / "results.json").read_text())["config"]
    assert str(tmp_path) not in json.dumps(config) and sum(config["family_counts"].values()) == 3


def scene_row(**fields) -> str:
    """A JSONL line on an example image that exists, with ``fields`` added."""
    scene = Path(__file__).parent.parent / "examples" / "images" / "scene0.png"
    return json.dumps({"image": str(scene), "question": "q", "answers": ["a"], **fields})


def test_jsonl_loader_reads_the_example_and_scores_by_metric(tmp_path):
    from mmprune.data.jsonl import load_jsonl
    from mmprune.data.metrics import score

    samples = load_jsonl(Path(__file__).parent.parent / "examples" / "tiny.jsonl")
    assert [s.metric for s in samples] == ["exact", "vqa", "yes/no", "exact"]
    assert samples[2].answers == ["no"] and samples[0].boxes == [(27, 64, 45, 82)]
    assert samples[0].image.size == (96, 96)
    assert score("0", ["0", "0", "0", "unsure"], "vqa") == 1.0 and score("0", ["0", "1", "1"], "vqa") == 1 / 3
    # fewer than three reference answers: a match is full credit, not capped at 1/3 or 2/3
    assert score("red", ["red"], "vqa") == 1.0 and score("red", ["red", "crimson"], "vqa") == 1.0
    assert score("blue", ["red"], "vqa") == 0.0
    assert score("Yes, there is.", ["yes"], "yes/no") == 1.0 and score("maybe", ["no"], "yes/no") == 0.0
    bad = tmp_path / "bad.jsonl"
    for line, message in (('{"question": "q", "answers": ["a"]}', "missing image"),
                          ('{"image": "x.png", "question": "q", "answers": []}', "non-empty list"),
                          ('{"image": "x.png", "question": "q", "answers": ["a"], "metric": "bleu"}', "not one of"),
                          ('{"image": "x.png", "question": "q", "answers": ["a"]}', "cannot be read"),
                          (scene_row(boxes=[1, 2, 3, 4]), r"'boxes' must be a list of \[x0, y0, x1, y1\]"),
                          (scene_row(boxes=[[4, 2, 3, 9]]), "x0 < x1"),
                          (scene_row(family=3), "'family' must be a non-empty string, got 3"),
                          ("not json", "not JSON")):
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            load_jsonl(bad)


TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 32, "patch_size": 8, "projection_dim": 16}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 32064, "max_position_embeddings": 512}
TINY_GEOMETRIES = {
    "llava": {"family": "llava", "vision": TINY_CLIP, "text": TINY_TEXT},
    "llava_next": {"family": "llava_next", "vision": TINY_CLIP, "text": TINY_TEXT, "image": 64},
    "qwen2_5_vl": {"family": "qwen2_5_vl", "image": 32,
                   "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                              "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
                              "out_hidden_size": 32, "window_size": 16, "fullatt_block_indexes": [1],
                              "in_channels": 3},
                   "text": dict(TINY_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})},
}


@pytest.mark.parametrize("family", list(TINY_GEOMETRIES))
def test_speed_mode_times_methods_on_a_random_architecture(family):
    from mmprune.bench.speed import speed_markdown, speed_sweep

    rows = speed_sweep(TINY_GEOMETRIES[family], ["fastervlm", "fastv"], [0.25], batches=(1, 2), text=8, reps=1,
                       decode_steps=2, device="cpu")
    assert [(r["batch"], r["method"], r["status"]) for r in rows] == [
        (1, "fastervlm", "ok"), (1, "fastv", "ok"), (2, "fastervlm", "ok"), (2, "fastv", "ok")]
    assert all(r["flops_speedup"] > 1 and r["prefill_ms"] > 0 for r in rows)
    visual = {"llava": 16, "llava_next": 88, "qwen2_5_vl": 16}[family]
    assert rows[0]["visual_tokens"] == visual and rows[0]["tokens_per_layer_last"] == round(0.25 * visual)
    assert "| fastv | 0.25 |" in speed_markdown(rows)


def test_speed_mode_counts_flowcuts_shortened_encoder():
    """FlowCut keeps as many LLM tokens as FasterVLM but prunes inside the tower (4 CLIP layers: feature layer 2,
    layer 1 prunes to [CLS] + 4): its predicted speedup is larger, by the encoder and projector it saves."""
    from mmprune.bench.speed import speed_sweep

    geometry = dict(TINY_GEOMETRIES["llava"], vision=dict(TINY_CLIP, num_hidden_layers=4))
    rows = speed_sweep(geometry, ["fastervlm", "flowcut"], [0.25], batches=(1, 2), text=8, reps=1, decode_steps=2,
                       device="cpu", progress=False)
    assert [(r["batch"], r["method"], r["status"]) for r in rows] == [
        (1, "fastervlm", "ok"), (1, "flowcut", "ok"), (2, "fastervlm", "ok"), (2, "flowcut", "ok")]
    for fastervlm, flowcut in (rows[:2], rows[2:]):
        assert flowcut["tokens_per_layer_last"] == fastervlm["tokens_per_layer_last"] == 4
        assert flowcut["flops_speedup"] > fastervlm["flops_speedup"] > 1


def test_speed_mode_times_video_methods_on_a_video_geometry():
    from mmprune.bench.speed import speed_markdown, speed_sweep

    geometry = dict(TINY_GEOMETRIES["qwen2_5_vl"], video={"frames": 4, "size": 32})
    rows = speed_sweep(geometry, ["evs", "dycoke", "fastv"], [0.5], batches=(1,), text=8, reps=1, decode_steps=2,
                       device="cpu", progress=False)
    assert [(r["method"], r["status"]) for r in rows] == [("evs", "ok"), ("dycoke", "ok"), ("fastv", "ok")]
    # 4 frames of 32 px, patch 4, 2 frames per grid, merge 2: 2 grids of 4 x 4 = 32 video tokens
    assert all(r["visual_tokens"] == 32 and r["flops_speedup"] > 1 for r in rows)
    by = {r["method"]: r for r in rows}
    assert by["evs"]["tokens_per_layer_last"] == 16 and by["dycoke"]["tokens_per_layer_last"] == 16 + 8
    assert "| evs | 0.5 |" in speed_markdown(rows)


def test_speed_mode_times_audio_methods_on_an_omni_geometry():
    """A tiny Qwen2.5-Omni thinker (12 layers, so SEATS' default stages fit: 7, 8, 9, late 10) on 4 s of audio
    with its 8-frame video: 4 grids of 4 x 4 = 64 video tokens and 100 audio tokens, interleaved in 2-s chunks."""
    from mmprune.bench.speed import speed_sweep

    if not omni_supported():
        pytest.skip("the Omni thinker is supported from transformers 5.21")
    geometry = dict(TINY_GEOMETRIES["qwen2_5_vl"], family="qwen2_5_omni", video={"frames": 8, "size": 32},
                    audio={"seconds": 4}, text=dict(TINY_GEOMETRIES["qwen2_5_vl"]["text"], num_hidden_layers=12),
                    audio_tower={"num_mel_bins": 16, "encoder_layers": 2, "encoder_attention_heads": 4,
                                 "encoder_ffn_dim": 64, "d_model": 32, "n_window": 50, "output_dim": 32,
                                 "max_source_positions": 1500})
    rows = speed_sweep(geometry, ["seats", "random", "fastv", "fastervlm"], [0.25], batches=(1,), text=8, reps=1,
                       decode_steps=2, device="cpu", progress=False, keep_audio=0.5)
    by = {r["method"]: r for r in rows}
    assert [by[m]["status"] for m in ("seats", "random", "fastv")] == ["ok"] * 3
    assert by["fastervlm"]["status"].startswith("failed: ValueError: fastervlm does not prune")
    assert all(by[m]["visual_tokens"] == 164 and by[m]["flops_speedup"] > 1 for m in ("seats", "random", "fastv"))
    assert by["random"]["tokens_per_layer_last"] == 16 + 50  # a quarter of the video, half of the audio
    assert by["seats"]["tokens_per_layer_last"] == 0  # every audio and video token left before the late layer


def test_all_methods_are_the_ones_that_prune_images():
    from mmprune.cli import bench_methods

    methods = bench_methods("all")
    assert {"none", "fastv", "fastervlm", "flowcut", "prumerge"} <= set(methods)
    assert not {"evs", "dycoke", "framefusion", "seats"} & set(methods)
    assert bench_methods("FastV,visionzip") == ["fastv", "visionzip"]


def tiny_llava_for_speed():
    from mmprune.bench.speed import build

    torch.manual_seed(0)
    return build(TINY_GEOMETRIES["llava"], torch.device("cpu"), torch.float32)


def test_reference_style_selections_equal_mmprunes():
    """FastV computed as its reference code does (eager weights at layer K-1, a manual layer loop) and FasterVLM
    from the CLIP tower's output_attentions keep the same tokens as mmprune's hooks, with the same logits; the
    comparison can tell them apart (FastV scored one layer later keeps other tokens)."""
    from mmprune.bench.reference import fastv_reference, supports
    from mmprune.bench.side_by_side import stack_inputs
    from mmprune.bench.speed import build, inputs_for
    from mmprune.engine.session import final_kept

    model = tiny_llava_for_speed()
    samples = [inputs_for(TINY_GEOMETRIES["llava"], model, 1, 8, seed=seed)[0] for seed in range(4)]
    later_differs = False
    for method, params in (("fastv", {"keep": 0.25}), ("fastv", {"keep": 5, "layer": 3}),
                           ("fastervlm", {"keep": 0.25}), ("fastervlm", {"keep": 7})):
        pruner = mmprune.get(method, **params)
        reference = REFERENCES[method]
        kept = []
        for inputs in samples:
            with pruner.attach(model), torch.no_grad():
                logits = model(**inputs, use_cache=True, logits_to_keep=1).logits
            kept.append(final_kept(pruner.stats)[0][0])
            run = reference.run(model, inputs, pruner)
            assert run.kept == [kept[-1]], (method, params)
            assert len(run.kept[0]) == pruner.budget(16)
            torch.testing.assert_close(run.logits, logits, rtol=1e-4, atol=1e-4)
            if method == "fastv" and params.get("layer") is None:
                later_differs |= fastv_reference(model, inputs, 4, layer=3).kept != run.kept
        if reference.batched:  # the reference's batched path keeps, per prompt, what each alone keeps
            assert reference.run(model, stack_inputs(samples), pruner).kept == kept
    assert later_differs
    with pytest.raises(ValueError, match="one prompt at a time"):
        fastv_reference(model, stack_inputs(samples[:2]), 4)
    qwen = build(TINY_GEOMETRIES["qwen2_5_vl"], torch.device("cpu"), torch.float32)
    assert "runs LLaVA-1.5" in supports(qwen, "fastv") and "no reference-style" in supports(model, "dart")
    assert supports(model, "fastv") is None


def test_side_by_side_writes_every_column_and_flags_noise():
    from mmprune.bench.side_by_side import side_by_side, side_by_side_markdown, summarize

    geometry = dict(TINY_GEOMETRIES["llava"], vision=dict(TINY_CLIP, num_hidden_layers=4))  # room for FlowCut
    result = side_by_side(geometry, ["fastervlm", "fastv", "flowcut"], [0.25], batch=2, text=8, reps=2,
                          device="cpu", progress=False)
    rows = result["rows"]
    assert [(r["method"], r["implementation"], r["status"]) for r in rows] == [
        ("none", "stock", "ok"), ("fastervlm", "mmprune", "ok"), ("fastervlm", "reference-style", "ok"),
        ("fastv", "mmprune", "ok"), ("fastv", "reference-style", "ok"), ("flowcut", "mmprune", "ok")]
    assert [r["same_kept"] for r in rows] == [None, None, True, None, True, None]
    for row in rows:
        for mode in ("one_by_one", "batch"):
            if row["method"] == "fastv" and row["implementation"] == "reference-style" and mode == "batch":
                assert row[mode] is None and mode not in row["times_s"]  # batch 1 only, as its reference
                continue
            stats = row[mode]
            assert len(row["times_s"][mode]["total"]) == 2  # the warm-up round is dropped
            assert stats["ms_min"] <= stats["ms"] <= stats["ms_max"] and stats["encoder_ms"] > 0
            assert stats["llm_ms"] == pytest.approx(1000 * statistics.median(
                [t - e for t, e in zip(row["times_s"][mode]["total"], row["times_s"][mode]["encoder"])]))
            assert ("speedup" in stats) == (row["implementation"] != "stock")
            assert ("vs_mmprune" in stats) == (row["implementation"] == "reference-style")
        assert "noise" in row and "timing_noisy" in row
        assert (row["batching_gain"] is None) == (row["method"] == "fastv" and row["implementation"] ==
                                                  "reference-style")
    by = {(r["method"], r["implementation"]): r for r in rows}
    # FlowCut also shortens the encoder: the FLOPs the encoder keeps fall, and its speedup bound rises
    assert by[("flowcut", "mmprune")]["flops_speedup"] > by[("fastervlm", "mmprune")]["flops_speedup"] > 1
    assert by[("fastervlm", "reference-style")]["flops_speedup"] == by[("fastervlm", "mmprune")]["flops_speedup"]
    machine = result["machine"]
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "transformers", "device_name", "dtype",
                "attn_implementation"):
        assert machine[key] not in (None, ""), key
    assert 0 < result["flops"]["encoder_share"] < 1
    text = side_by_side_markdown(result)
    assert "| fastv | reference-style | 0.25 | 10 | one batch of B | batch 1 only" in text
    assert f"{machine['torch_threads']} torch threads" in text and "B one by one" in text

    # paired, steady timings: no flag; an injected implausible timing and a spread wider than the effect: flagged
    fastervlm = by[("fastervlm", "mmprune")]
    for row in rows:
        for mode, seconds in row["times_s"].items():
            seconds["total"], seconds["encoder"] = [1.0, 1.0], [0.1, 0.1]
    for mode in ("one_by_one", "batch"):
        fastervlm["times_s"][mode]["total"] = [0.9, 0.9]
    fastervlm["times_s"]["batch"]["total"] = [0.45, 0.45]
    by[("none", "stock")]["times_s"]["batch"]["total"] = [0.5, 0.5]
    summarize(rows)
    assert fastervlm["timing_noisy"] is None
    assert fastervlm["batch"]["speedup"]["median"] == pytest.approx(0.5 / 0.45)
    assert fastervlm["batching_gain"]["median"] == pytest.approx(2.0)
    fastervlm["times_s"]["one_by_one"]["total"] = [0.01, 0.01]  # 100x where FLOPs predict ~1.3x
    fastervlm["times_s"]["batch"]["total"] = [0.45, 0.2]  # speedups 1.11x and 2.5x: spread 1.39 > effect
    summarize(rows)
    assert "B one by one prefill 100.0x where FLOPs predict" in fastervlm["noise"]["one_by_one speedup"]
    assert "spread 1.389 exceeds the effect" in fastervlm["noise"]["batch speedup"]
    assert "100.00x*" in side_by_side_markdown(result)
    assert "(noise, not a result)" in side_by_side_markdown(result)


def test_side_by_side_from_the_command_line(tmp_path, monkeypatch, capsys):
    from mmprune.bench import speed

    monkeypatch.setitem(speed.GEOMETRIES, "tiny", TINY_GEOMETRIES["llava"])
    assert main(["bench", "--speed", "--side-by-side", "--geometry", "tiny", "--methods", "fastv", "--keep",
                 "0.25", "--batches", "2", "--reps", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "side_by_side.json").read_text())
    assert data["machine"]["torch_threads"] == 1 and data["settings"]["batch"] == 2
    assert [r["implementation"] for r in data["rows"]] == ["stock", "mmprune", "reference-style"]
    assert "| fastv | mmprune | 0.25 |" in (tmp_path / "side_by_side.md").read_text()
    capsys.readouterr()
