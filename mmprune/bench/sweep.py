"""``mmprune bench``: every method x budget next to the unpruned model and the random and pool baselines.

Per (method, keep) row: accuracy and retention (pruned / unpruned), overall and per family; visual tokens
entering the LLM, per layer and their equivalent average; analytical FLOPs (``mmprune.bench.flops``) and the
speedup they predict; measured prefill and end-to-end latency (warm-up, repetitions, median; pruned and unpruned
runs interleaved in one process so their ratio is fair on a noisy machine); KV-cache bytes after prefill;
selection overhead as a share of pruned prefill time; selection stability (mean Jaccard overlap of the kept sets
of an image and the same image with +-1/255 uniform noise); relevant-patch recall (share of the patches under
the ground-truth boxes that were kept). A method that raises is reported as failed; the sweep goes on.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import mmprune
from mmprune import upstream
from mmprune.bench.accuracy import evaluate, prompts
from mmprune.bench.flops import Geometry, decode_flops, prefill_flops, tower_counts
from mmprune.data.synthetic import box_patches
from mmprune.engine.session import final_kept

BASELINES = ("none", "random", "pool")
# A measured speedup may exceed what FLOPs predict by this factor at most (memory effects at large batches reach
# ~1.15x on CPU); beyond it the timing is noise, not a result. The unpruned model timed against itself must read
# within 1 +- REFERENCE_TOLERANCE, or every timing of the run is suspect.
PLAUSIBLE_OVER_PREDICTION = 1.5
REFERENCE_TOLERANCE = 0.15


@dataclass
class SweepSettings:
    methods: list[str]
    keeps: list[int | float]
    batch: int = 16
    reps: int = 3  # timed repetitions (median) after one warm-up
    decode_steps: int = 8  # new tokens of the end-to-end measurement
    timing_samples: int = 8  # prompts of the latency batch
    stability_samples: int = 16
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _inputs(processor, samples, device):
    return processor(text=prompts(processor, [s.question for s in samples]), images=[s.image for s in samples],
                     padding=True, return_tensors="pt").to(device)


@torch.no_grad()
def timed_pair(model, inputs, pruner, reference, reps: int, decode_steps: int) -> dict:
    """Median prefill and end-to-end (prefill + ``decode_steps`` tokens) seconds of ``pruner`` and of
    ``reference`` (the unpruned model), runs interleaved; plus the pruned prefill's selection time and KV bytes."""
    def prefill(p):
        with p.attach(model):
            start = time.perf_counter()
            out = model(**inputs, use_cache=True)
            elapsed = time.perf_counter() - start
        kv = sum(keys.numel() * keys.element_size() + values.numel() * values.element_size()
                 for keys, values in upstream.cache_layer_tensors(upstream.output_cache(out)))
        return elapsed, kv, p.stats["selection_ms"]

    def end_to_end(p):
        with p.attach(model):
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=decode_steps, min_new_tokens=decode_steps, do_sample=False)
            return time.perf_counter() - start

    times = {"prefill": [], "prefill_ref": [], "e2e": [], "e2e_ref": [], "selection_ms": []}
    for rep in range(reps + 1):  # the first round warms up and is dropped
        ref_prefill, ref_kv, _ = prefill(reference)
        p_prefill, kv, selection = prefill(pruner)
        ref_e2e, p_e2e = end_to_end(reference), end_to_end(pruner)
        if rep:
            times["prefill_ref"].append(ref_prefill)
            times["prefill"].append(p_prefill)
            times["e2e_ref"].append(ref_e2e)
            times["e2e"].append(p_e2e)
            times["selection_ms"].append(selection)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update(kv_bytes=kv, kv_bytes_ref=ref_kv)
    return out


@torch.no_grad()
def stability(model, processor, samples, pruner, seed: int) -> float:
    """Mean Jaccard overlap of each image's final kept set with and without +-1/255 uniform pixel noise."""
    inputs = _inputs(processor, samples, model.device)
    with pruner.attach(model, tokenizer=processor):
        model(**inputs)
        clean = final_kept(pruner.stats)
        noisy_inputs = dict(inputs)
        std = torch.tensor(processor.image_processor.image_std, device=model.device).view(1, 3, 1, 1)
        generator = torch.Generator().manual_seed(seed)
        noise = (torch.rand(inputs["pixel_values"].shape, generator=generator) * 2 - 1).to(model.device) / 255.0
        noisy_inputs["pixel_values"] = inputs["pixel_values"] + noise / std
        model(**noisy_inputs)
        noisy = final_kept(pruner.stats)
    scores = []
    for a_sample, b_sample in zip(clean, noisy):
        for a, b in zip(a_sample, b_sample):
            union = set(a) | set(b)
            scores.append(len(set(a) & set(b)) / len(union) if union else 1.0)
    return sum(scores) / len(scores)


def to_model_pixels(box, width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """A box on the original image mapped onto the ``size`` x ``size`` input of a CLIP processor (shortest edge
    resized to ``size``, then centre-cropped), clipped to it."""
    scale = size / min(width, height)
    dx, dy = (width * scale - size) / 2, (height * scale - size) / 2
    x0, y0, x1, y1 = (box[0] * scale - dx, box[1] * scale - dy, box[2] * scale - dx, box[3] * scale - dy)
    return max(0.0, x0), max(0.0, y0), min(float(size), x1), min(float(size), y1)


def relevant_recall(samples, kept, grid: int | None, image_size: int | None) -> float | None:
    """Share of the patches under the samples' ground-truth boxes that were kept (single-grid models)."""
    if grid is None:
        return None
    hit = total = 0
    for sample, kept_sets in zip(samples, kept):
        chosen = set(kept_sets[0]) if kept_sets else set()
        for box in sample.boxes:
            x0, y0, x1, y1 = to_model_pixels(box, *sample.image.size, image_size)
            if x1 <= x0 or y1 <= y0:
                continue  # cropped away
            cells = set(box_patches((x0, y0, x1, y1), image_size, grid))
            hit += len(cells & chosen)
            total += len(cells)
    return hit / total if total else None


def single_grid(model) -> tuple[int | None, int | None]:
    vision = model.config.vision_config
    if type(model).__name__ == "LlavaForConditionalGeneration" and hasattr(vision, "image_size"):
        return vision.image_size // vision.patch_size, vision.image_size
    return None, None


def flops_of(geometry: Geometry, result: dict, crops: int = 1) -> float:
    """Mean per-sample prefill FLOPs (and the decode FLOPs of the first step) from an evaluation's stats."""
    total = []
    for text, sample in zip(result["text_tokens"], result["sample_stats"]):
        flops = prefill_flops(geometry, text, sample["tokens_per_layer"], crops * len(sample["images"]),
                              sample["visual_tokens_before"], **tower_counts(sample))
        total.append(flops["total"])
    return sum(total) / len(total)


def decode_flops_of(geometry: Geometry, result: dict) -> float:
    per_sample = [decode_flops(geometry, [t + v for v in s["tokens_per_layer"]], 1)
                  for t, s in zip(result["text_tokens"], result["sample_stats"])]
    return sum(per_sample) / len(per_sample)


def run_sweep(model, processor, samples, settings: SweepSettings) -> list[dict]:
    """One row per (method, keep), the unpruned model first."""
    methods = list(dict.fromkeys([*BASELINES, *settings.methods]))
    jobs = [("none", 1.0)] + [(m, k) for m in methods if m != "none" for k in settings.keeps]
    geometry = Geometry.from_config(model.config)
    grid, image_size = single_grid(model)
    timing = samples[:settings.timing_samples]
    timing_inputs = _inputs(processor, timing, model.device)
    reference = mmprune.get("none")
    rows, base = [], None
    bar = tqdm(jobs, desc="bench", disable=not settings.progress, unit="run")
    for method, keep in bar:
        bar.set_postfix_str(f"{method} keep={keep}")
        row = {"method": method, "keep": keep, "baseline": method in BASELINES, "status": "ok"}
        try:
            pruner = mmprune.get(method, keep=keep)
            row["keep_means"] = pruner.keep_means
            result = evaluate(model, processor, samples, pruner=pruner, batch_size=settings.batch)
            stats = result["sample_stats"]
            row.update(
                accuracy=result["accuracy"],
                families=result["families"],
                visual_tokens_before=_mean(s["visual_tokens_before"] for s in stats),
                visual_tokens_llm_input=_mean(s.get("visual_tokens_llm_input", s["visual_tokens_after"])
                                              for s in stats),
                visual_tokens_after=_mean(s["visual_tokens_after"] for s in stats),
                equivalent_tokens=_mean(s["equivalent_tokens"] for s in stats),
                tokens_per_layer=[_mean(s["tokens_per_layer"][i] for s in stats)
                                  for i in range(len(stats[0]["tokens_per_layer"]))],
                flops_prefill=flops_of(geometry, result),
                flops_decode_step=decode_flops_of(geometry, result),
                recall=relevant_recall(samples, result["kept"], grid, image_size),
            )
            speed = timed_pair(model, timing_inputs, mmprune.get(method, keep=keep), reference, settings.reps,
                               settings.decode_steps)
            row.update(
                prefill_ms=1000 * speed["prefill"], prefill_ms_unpruned=1000 * speed["prefill_ref"],
                e2e_ms=1000 * speed["e2e"], e2e_ms_unpruned=1000 * speed["e2e_ref"],
                prefill_speedup=speed["prefill_ref"] / speed["prefill"],
                e2e_speedup=speed["e2e_ref"] / speed["e2e"],
                kv_bytes=speed["kv_bytes"] / len(timing), kv_bytes_unpruned=speed["kv_bytes_ref"] / len(timing),
                selection_share=speed["selection_ms"] / (1000 * speed["prefill"]),
                stability=stability(model, processor, samples[:settings.stability_samples],
                                    mmprune.get(method, keep=keep), settings.seed),
            )
            if method == "none":
                base = row
        except Exception as exc:  # a failing method is a row, not the end of the sweep
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
    for row in rows:
        if row["status"] == "ok" and base is not None:
            row["retention"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else math.nan
            row["family_retention"] = {f: (a / base["families"][f] if base["families"].get(f) else math.nan)
                                       for f, a in row["families"].items()}
            row["flops_speedup"] = base["flops_prefill"] / row["flops_prefill"]
            steps = settings.decode_steps
            row["flops_e2e_speedup"] = ((base["flops_prefill"] + steps * base["flops_decode_step"])
                                        / (row["flops_prefill"] + steps * row["flops_decode_step"]))
    flag_noisy_timings(rows)
    return rows


def flag_noisy_timings(rows: list[dict]) -> None:
    """Set ``timing_noisy`` (the reason, or None) on every successful row: a measured speedup more than
    PLAUSIBLE_OVER_PREDICTION times what FLOPs predict cannot come from the pruning, and a reference that reads
    far from 1x against itself means the machine was busy."""
    base = next((r for r in rows if r["method"] == "none" and r["status"] == "ok"), None)
    reference = None
    if base is not None and abs(base["prefill_speedup"] - 1) > REFERENCE_TOLERANCE:
        reference = f"the unpruned model timed against itself reads {base['prefill_speedup']:.2f}x"
    for row in rows:
        if row["status"] != "ok" or "flops_speedup" not in row:
            continue
        reasons = [reference] + [implausible("prefill", row["prefill_speedup"], row["flops_speedup"]),
                                 implausible("end-to-end", row["e2e_speedup"], row["flops_e2e_speedup"])]
        row["timing_noisy"] = "; ".join(r for r in reasons if r) or None


def implausible(kind: str, measured: float, predicted: float) -> str | None:
    """Why a measured speedup cannot come from the pruning (more than PLAUSIBLE_OVER_PREDICTION times what FLOPs
    predict), or None."""
    if measured > PLAUSIBLE_OVER_PREDICTION * predicted:
        return f"{kind} {measured:.1f}x where FLOPs predict {predicted:.1f}x"
    return None


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
