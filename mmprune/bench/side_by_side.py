"""``mmprune bench --speed --side-by-side``: the unpruned model, each method, and reference-style implementations of
the methods whose reference code scores differently, in two batching modes, timed in one run.

Per geometry (:mod:`mmprune.bench.speed`, random weights) the run builds ``B`` one-image prompts and times the
prefill of all ``B`` two ways: **B one by one** (``B`` forwards of one prompt) and **one batch of B** (one forward
of the ``B`` prompts stacked; they have one length, so nothing is padded). Every forward computes logits at the
last position only (``logits_to_keep=1``, as ``generate``'s prefill) and fills a KV cache. Rows:

* ``stock``: the unpruned model, nothing attached;
* ``mmprune``: each method attached;
* ``reference-style``: the same selection computed the way the method's reference code computes it
  (:mod:`mmprune.bench.reference`: FastV with eager attention weights at layer K-1, one prompt at a time;
  FasterVLM with the CLIP tower run eagerly with ``output_attentions``). Before timing, each one runs on every
  prompt beside its mmprune row, and ``same_kept`` records whether both kept the same tokens of every image (and
  ``max_logit_diff`` how far their last logits are apart).

Timing: every (row, mode) is a job; the run makes ``reps + 1`` rounds over all jobs, the first dropped as warm-up,
each round starting one job later than the one before (rows interleaved and rotated, so drift and position in the
round fall on every row alike). A speedup is the median over rounds of the per-round ratio to the unpruned row of
the same mode (paired by round), with its min-max; so are the batching gain (B one by one / one batch of B, per
row) and a reference-style row's time relative to its mmprune row. A ratio whose min-max spread exceeds its
distance from 1 is marked noisy, and so is a speedup above ``PLAUSIBLE_OVER_PREDICTION`` times what FLOPs
predict. Vision encoder time (the tower and projector modules, from forward hooks) is reported beside the rest of
the prefill (the LLM, with selection, embedding and the LM head); on a GPU those hooks synchronize the device
at the encoder's entry and exit, in every row alike. The machine (CPU model, cores, torch threads,
torch and transformers versions, device name, dtype, attention implementation) is written into the results.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from tqdm.auto import tqdm

import mmprune
from mmprune import upstream
from mmprune.bench.flops import Geometry
from mmprune.bench.reference import REFERENCES, supports
from mmprune.bench.speed import GEOMETRIES, build, flops_counter, inputs_for
from mmprune.bench.sweep import PLAUSIBLE_OVER_PREDICTION, implausible
from mmprune.engine.session import final_kept

MODES = ("one_by_one", "batch")
MODE_NAMES = {"one_by_one": "B one by one", "batch": "one batch of B"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, dtype: torch.dtype, attn_implementation: str) -> dict:
    """What the timings were taken on."""
    try:
        flash = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        flash = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
            "dtype": str(dtype).removeprefix("torch."), "attn_implementation": attn_implementation,
            "flash_attn": flash}


class EncoderClock:
    """Seconds spent inside a model's encoder modules (outermost calls only), summed until :meth:`take`."""

    def __init__(self, modules: list[torch.nn.Module], sync: Callable[[], None]) -> None:
        self.sync = sync
        self.depth = 0
        self.started = 0.0
        self.seconds = 0.0
        self.handles = []
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        if self.depth == 0:
            self.sync()
            self.started = time.perf_counter()
        self.depth += 1

    def _leave(self, module, args, output) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.sync()
            self.seconds += time.perf_counter() - self.started

    def take(self) -> float:
        seconds, self.seconds, self.depth = self.seconds, 0.0, 0
        return seconds

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class Job:
    row: int  # index into the rows
    mode: str
    context: Callable[[], contextlib.AbstractContextManager]  # entered outside the timed region (attach)
    body: Callable[[], None]  # the timed prefill(s)


def stack_inputs(samples: list[dict]) -> dict:
    """One batch of the one-prompt inputs ``samples`` (tensors concatenated along their first axis: prompts, or the
    patch rows of Qwen's flattened pixels)."""
    return {name: torch.cat([s[name] for s in samples]) if isinstance(value, torch.Tensor) else value
            for name, value in samples[0].items()}


def ratio_summary(ratios: list[float]) -> dict:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def spread_exceeds(what: str, ratios: list[float]) -> str | None:
    """Why a ratio of timings is noise: its min-max spread over the rounds exceeds its distance from 1 (or one
    round gave no spread to judge by); None when the effect stands out of the spread."""
    if len(ratios) < 2:
        return f"{what}: one timed round, no spread to judge it by"
    spread, effect = max(ratios) - min(ratios), abs(statistics.median(ratios) - 1)
    if spread > effect:
        return f"{what}: spread {spread:.3f} exceeds the effect {effect:.3f}"
    return None


def summarize(rows: list[dict]) -> None:
    """From each successful row's raw ``times_s`` (seconds per timed round and mode): per mode the median prefill,
    min-max, encoder and LLM medians and the speedup against the stock row (paired by round); the batching gain;
    a reference-style row's time against its mmprune row; ``noise`` (claim -> reason) and ``timing_noisy``
    (the reasons joined, or None). Run again after editing ``times_s``."""
    base = next(r for r in rows if r["implementation"] == "stock")
    mmprune_rows = {(r["method"], r["keep"]): r for r in rows if r["implementation"] == "mmprune"}
    for row in rows:
        if row["status"] != "ok":
            continue
        noise: dict[str, str] = {}
        for mode in MODES:
            times = row["times_s"].get(mode)
            if not times:
                row[mode] = None
                continue
            total, encoder = times["total"], times["encoder"]
            stats = {"ms": 1000 * statistics.median(total), "ms_min": 1000 * min(total),
                     "ms_max": 1000 * max(total), "encoder_ms": 1000 * statistics.median(encoder),
                     "llm_ms": 1000 * statistics.median([t - e for t, e in zip(total, encoder)])}
            if row is not base:
                speedup = ratio_summary([b / t for b, t in zip(base["times_s"][mode]["total"], total)])
                stats["speedup"] = speedup
                reasons = [spread_exceeds(f"{MODE_NAMES[mode]} speedup", [b / t for b, t in zip(
                               base["times_s"][mode]["total"], total)]),
                           implausible(f"{MODE_NAMES[mode]} prefill", speedup["median"], row["flops_speedup"])]
                if any(reasons):
                    noise[f"{mode} speedup"] = "; ".join(r for r in reasons if r)
            twin = mmprune_rows.get((row["method"], row["keep"]))
            if row["implementation"] == "reference-style" and twin is not None and twin["times_s"].get(mode):
                ratios = [t / m for t, m in zip(total, twin["times_s"][mode]["total"])]
                stats["vs_mmprune"] = ratio_summary(ratios)
                reason = spread_exceeds(f"{MODE_NAMES[mode]} time vs mmprune", ratios)
                if reason:
                    noise[f"{mode} vs mmprune"] = reason
            row[mode] = stats
        if row["one_by_one"] and row["batch"]:
            ratios = [o / b for o, b in zip(row["times_s"]["one_by_one"]["total"], row["times_s"]["batch"]["total"])]
            row["batching_gain"] = ratio_summary(ratios)
            reason = spread_exceeds("batching gain", ratios)
            if reason:
                noise["batching gain"] = reason
        else:
            row["batching_gain"] = None
        row["noise"] = noise
        row["timing_noisy"] = "; ".join(noise.values()) or None


@torch.no_grad()
def side_by_side(geometry: str | dict, methods: list[str], keeps: list, batch: int = 8, text: int = 64,
                 reps: int = 3, device: str | None = None, attn_implementation: str = "sdpa",
                 progress: bool = True) -> dict:
    """``{"machine", "settings", "flops", "rows"}``: see the module docstring. ``batch`` is B (>= 2)."""
    if batch < 2:
        raise ValueError(f"batch={batch}: the side-by-side table compares one batch of B with B one by one; "
                         "expected B >= 2")
    if reps < 1:
        raise ValueError(f"reps={reps}: expected >= 1 timed rounds")
    spec = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    name = geometry if isinstance(geometry, str) else "custom"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(spec, device, dtype, attn_implementation)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modality = "video" if "video" in spec else "image"
    samples = []
    for seed in range(batch):  # B different prompts of one length
        inputs, visual, crop_tokens = inputs_for(spec, model, 1, text, seed=seed)
        samples.append(inputs)
    batched = stack_inputs(samples)
    last = upstream.last_logits_only(model)
    text_tokens = samples[0]["input_ids"].shape[1] - visual
    count = flops_counter(spec, model, text_tokens, visual, crop_tokens)
    unpruned = count([visual] * Geometry.from_config(model.config).layers)

    def prefill(inputs: dict) -> torch.Tensor:
        return model(**inputs, use_cache=True, **last).logits

    def one_by_one(run: Callable[[dict], object]) -> Callable[[], None]:
        def each() -> None:
            for inputs in samples:
                run(inputs)

        return each

    common = {"geometry": name, "batch": batch, "visual_tokens": visual, "text_tokens": text_tokens}
    rows = [dict(common, method="none", keep=1.0, implementation="stock", status="ok", equivalent_tokens=visual,
                 flops_speedup=1.0, flops_encoder_share=unpruned["vision"] / unpruned["total"],
                 same_kept=None, times_s={})]
    jobs = [Job(0, mode, contextlib.nullcontext, body) for mode, body in
            (("one_by_one", one_by_one(prefill)), ("batch", lambda: prefill(batched)))]
    skipped = {}
    bar = tqdm(total=len(methods) * len(keeps), desc="check", unit="method", disable=not progress)
    for method in methods:
        for keep in keeps:
            bar.set_postfix_str(f"{method} keep={keep}")
            row = dict(common, method=method, keep=keep, implementation="mmprune", status="ok", same_kept=None,
                       times_s={})
            rows.append(row)
            try:
                pruner = mmprune.get(method, keep=keep)
                kept, logits, flops, t_eq = [], [], [], []
                with pruner.attach(model):
                    for inputs in samples:  # each prompt alone: its kept set, stats and logits
                        logits.append(prefill(inputs))
                        sample = pruner.stats["samples"][0]
                        kept.append(final_kept(pruner.stats, modality)[0])
                        flops.append(count(sample["tokens_per_layer"], sample))
                        t_eq.append(statistics.mean(sample["tokens_per_layer"]))
                row.update(equivalent_tokens=statistics.mean(t_eq),
                           flops_speedup=unpruned["total"] * batch / sum(f["total"] for f in flops),
                           flops_encoder_share=sum(f["vision"] for f in flops) / sum(f["total"] for f in flops))
            except Exception as exc:  # reported, the run goes on  # noqa: BLE001
                row["status"] = failure(exc)
                bar.update()
                continue
            index = len(rows) - 1
            jobs += [Job(index, "one_by_one", lambda p=pruner: p.attach(model), one_by_one(prefill)),
                     Job(index, "batch", lambda p=pruner: p.attach(model), lambda: prefill(batched))]
            why_not = supports(model, method)
            if why_not is not None:
                if method in REFERENCES:
                    skipped[method] = why_not
                bar.update()
                continue
            reference = REFERENCES[method]
            ref_row = dict(row, implementation="reference-style", reference=reference.source, times_s={})
            rows.append(ref_row)
            try:
                runs = [reference.run(model, inputs, pruner) for inputs in samples]
                same = [run.kept[0] for run in runs] == [item[0] for item in kept]
                diff = max(float((run.logits.float() - mine.float()).abs().max()) for run, mine in zip(runs, logits))
                if reference.batched:
                    together = reference.run(model, batched, pruner)
                    same = same and together.kept == [item[0] for item in kept]
                ref_row.update(same_kept=same, max_logit_diff=diff)
            except Exception as exc:  # noqa: BLE001
                ref_row["status"] = failure(exc)
                bar.update()
                continue
            index = len(rows) - 1
            jobs.append(Job(index, "one_by_one", contextlib.nullcontext,
                            one_by_one(lambda inputs, r=reference, p=pruner: r.run(model, inputs, p))))
            if reference.batched:
                jobs.append(Job(index, "batch", contextlib.nullcontext,
                                lambda r=reference, p=pruner: r.run(model, batched, p)))
            bar.update()
    bar.close()

    clock = EncoderClock(upstream.encoder_modules(model.model), sync)
    try:
        bar = tqdm(total=(reps + 1) * len(jobs), desc="speed", unit="job", disable=not progress)
        for round_index in range(reps + 1):  # round 0 warms up and is dropped
            shift = round_index % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:
                row = rows[job.row]
                bar.set_postfix_str(f"round {round_index} {row['method']} {row['implementation']} {job.mode}")
                with job.context():
                    sync()
                    clock.take()
                    started = time.perf_counter()
                    job.body()
                    sync()
                    total = time.perf_counter() - started
                    encoder = clock.take()
                if round_index:
                    times = row["times_s"].setdefault(job.mode, {"total": [], "encoder": []})
                    times["total"].append(total)
                    times["encoder"].append(encoder)
                bar.update()
        bar.close()
    finally:
        clock.remove()
    summarize(rows)
    settings = {"geometry": name, "batch": batch, "visual_tokens": visual, "text_tokens": text_tokens,
                "methods": methods, "keeps": keeps, "reps": reps, "warmup_rounds": 1,
                "order": "every (row, mode) once per round; each round starts one job later (interleaved, rotated)",
                "logits": "last position only (logits_to_keep=1), KV cache on",
                "plausible_over_prediction": PLAUSIBLE_OVER_PREDICTION, "references_skipped": skipped}
    flops = {"unpruned_total": unpruned["total"], "unpruned_vision": unpruned["vision"],
             "encoder_share": unpruned["vision"] / unpruned["total"],
             "bound_if_encoder_whole": unpruned["total"] / unpruned["vision"]}
    return {"machine": machine_info(device, dtype, attn_implementation), "settings": settings, "flops": flops,
            "rows": rows}


def failure(exc: Exception) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _ratio(summary: dict | None, noisy: bool) -> str:
    if not summary:
        return ""
    return f"{summary['median']:.2f}x{'*' if noisy else ''} [{summary['min']:.2f}-{summary['max']:.2f}]"


def side_by_side_markdown(result: dict) -> str:
    machine, settings, flops = result["machine"], result["settings"], result["flops"]
    threads = machine["torch_threads"]
    device = machine["device_name"] if machine["device"] == "cuda" else f"CPU {machine['cpu']}"
    lines = [
        f"Machine: {device}; {machine['usable_cpus']} usable of {machine['cpu_count']} CPUs, {threads} torch "
        f"threads; torch {machine['torch']}, transformers {machine['transformers']}; {machine['dtype']}, "
        f"{machine['attn_implementation']} attention.",
        f"Geometry {settings['geometry']}: B = {settings['batch']} prompts of {settings['visual_tokens']} visual + "
        f"{settings['text_tokens']} text tokens; prefill of all B (logits at the last position, KV cache on); "
        f"median of {settings['reps']} rounds [min-max] after one warm-up round, rows interleaved and rotated.",
        f"FLOPs: the vision encoder and projector are {100 * flops['encoder_share']:.1f}% of the unpruned "
        f"prefill, so a method that leaves them whole is at most {flops['bound_if_encoder_whole']:.1f}x faster.",
        "",
        "| method | implementation | keep | T_eq | mode | prefill ms [min-max] | encoder ms | LLM ms | "
        "speedup [min-max] | FLOPs speedup | batching gain | time vs mmprune | same kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        head = f"| {row['method']} | {row['implementation']} | {row['keep']} |"
        if row["status"] != "ok":
            lines.append(f"{head} | | {row['status']} | | | | | | | |")
            continue
        noise = row["noise"]
        same = {True: "yes", False: "**no**", None: ""}[row["same_kept"]]
        for mode in MODES:
            stats = row[mode]
            if stats is None:
                lines.append(f"{head} {row['equivalent_tokens']:.0f} | {MODE_NAMES[mode]} | batch 1 only (as its "
                             f"reference code) | | | | | | | {same} |")
                continue
            gain = _ratio(row["batching_gain"], "batching gain" in noise) if mode == "batch" else ""
            lines.append(
                f"{head} {row['equivalent_tokens']:.0f} | {MODE_NAMES[mode]} | {stats['ms']:.0f} "
                f"[{stats['ms_min']:.0f}-{stats['ms_max']:.0f}] | {stats['encoder_ms']:.0f} | {stats['llm_ms']:.0f} | "
                f"{_ratio(stats.get('speedup'), f'{mode} speedup' in noise) or '1 (baseline)'} | "
                f"{row['flops_speedup']:.2f}x | {gain} | "
                f"{_ratio(stats.get('vs_mmprune'), f'{mode} vs mmprune' in noise)} | {same} |")
    notes = [f"* {row['method']} {row['implementation']} keep={row['keep']}: {reason} (noise, not a result)"
             for row in result["rows"] if row["status"] == "ok" for reason in row["noise"].values()]
    skipped = [f"- no reference-style row for {method}: {why}"
               for method, why in settings.get("references_skipped", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else []) + ([""] + skipped if skipped else []))
