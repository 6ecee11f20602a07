"""Measure what makes the shipped model a fair stand-in for a real VLM: ``python -m mmprune.zoo.report``.

* accuracy on the held-out benchmark (seed 0), overall and per family;
* image dependence: accuracy with every image replaced by uniform noise, next to chance (the share of the most
  frequent answer of each family);
* [CLS] concentration: FasterVLM at 25% keeps exactly the top 25% of patches by [CLS] attention at
  ``vision_feature_layer``; the share of question-relevant objects with at least one kept patch (and the share of
  their patches kept), next to random selection at the same budget;
* locality: accuracy when the LLM sees only the relevant objects' patches, and only the other patches (the
  questions whose answer is one object's attribute);
* pruning at 11% (16 of 144 tokens): [CLS]-based methods against random selection and pooling, and FasterVLM
  with the kept tokens' original position ids instead of renumbered ones.

Writes ``report.json`` and prints Markdown tables (the README's).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from PIL import Image

import mmprune
from mmprune.bench.accuracy import evaluate, family_accuracy
from mmprune.bench.sweep import relevant_recall
from mmprune.data import synthetic
from mmprune.media import Selection, MediaItem
from mmprune.methods.base import PreLLMPruner
from mmprune.zoo import SHIPPED_MODEL, load_shipped

OBJECT_FAMILIES = ("attribute", "small", "border")  # the answer is one object's attribute


@dataclass
class FixedSetPruner(PreLLMPruner):
    """A measurement device, not a method: keeps given token indices per sample (one image per sample)."""

    keep: int | float = 1.0
    indices: list[list[int]] = field(default_factory=list)

    name: ClassVar[str] = "fixed-set"

    def prune_image(self, tokens: MediaItem) -> Selection:
        return Selection.of(torch.tensor(sorted(set(self.indices[tokens.sample])), device=tokens.embeds.device))


def chance(samples) -> dict[str, float]:
    """Per family, the share of its most frequent canonical answer (what an image-blind model can reach)."""
    by_family = defaultdict(Counter)
    for s in samples:
        by_family[s.family][s.answers[0]] += 1
    return {f: max(c.values()) / sum(c.values()) for f, c in by_family.items()}


def relevant_patches(sample, image_size: int, grid: int) -> list[list[int]]:
    return [synthetic.box_patches(box, image_size, grid) for box in sample.boxes]


def coverage(samples, kept: list[list[list[int]]], image_size: int, grid: int) -> dict[str, float]:
    """Share of relevant objects with >= 1 kept patch, and share of relevant patches kept (the bench's recall)."""
    hit = objects = 0
    for s, kept_sets in zip(samples, kept):
        chosen = set(kept_sets[0])
        for cells in relevant_patches(s, image_size, grid):
            objects += 1
            hit += bool(chosen & set(cells))
    return {"objects_covered": hit / objects, "patches_kept": relevant_recall(samples, kept, grid, image_size)}


def run_batched(model, processor, samples, pruner_for_chunk, batch_size: int) -> dict:
    """``evaluate`` over chunks, each with its own pruner (kept sets that depend on the samples): accuracy overall
    and per family."""
    answers = []
    for start in tqdm(range(0, len(samples), batch_size), desc="locality", unit="batch", leave=False):
        chunk = samples[start:start + batch_size]
        answers += evaluate(model, processor, chunk, pruner=pruner_for_chunk(chunk), batch_size=batch_size)["answers"]
    return family_accuracy(samples, answers)


def measure(model_path: str | Path = SHIPPED_MODEL, n: int = 1000, seed: int = 0, batch_size: int = 50) -> dict:
    model, processor = load_shipped(model_path)
    vision = model.config.vision_config
    image_size, grid = vision.image_size, vision.image_size // vision.patch_size
    tokens = grid * grid
    samples = synthetic.generate(n, seed=seed, size=image_size)
    report: dict = {"model": str(model_path), "n": n, "seed": seed, "visual_tokens": tokens}

    clean = evaluate(model, processor, samples, batch_size=batch_size, progress="unpruned")
    report["accuracy"] = {"overall": clean["accuracy"], **clean["families"]}

    rng = np.random.default_rng([seed, 7])
    noisy = [synthetic.Sample(Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)),
                              s.question, s.answers, s.family, s.boxes, s.index, s.seed) for s in samples]
    noise = evaluate(model, processor, noisy, batch_size=batch_size, progress="noise images")
    report["noise_image"] = {"overall": noise["accuracy"], **noise["families"]}
    report["chance"] = chance(samples)

    with_boxes = [s for s in samples if s.boxes]
    quarter = max(1, tokens // 4)
    for name in ("fastervlm", "random"):
        out = evaluate(model, processor, with_boxes, pruner=mmprune.get(name, keep=quarter), batch_size=batch_size,
                       progress=f"{name} recall")
        report["cls_top25" if name == "fastervlm" else "random_25"] = coverage(with_boxes, out["kept"], image_size,
                                                                                grid)

    objects = [s for s in samples if s.family in OBJECT_FAMILIES]

    def touched(s) -> set[int]:  # every patch a relevant box overlaps at all
        return {i for box in s.boxes for i in synthetic.box_patches(box, image_size, grid, min_cover=0.0)}

    def own(chunk):
        return FixedSetPruner(indices=[[i for cells in relevant_patches(s, image_size, grid) for i in cells]
                                       for s in chunk])

    def others(chunk):
        return FixedSetPruner(indices=[sorted(set(range(tokens)) - touched(s)) for s in chunk])

    report["locality"] = {
        "object_patches_only": run_batched(model, processor, objects, own, batch_size),
        "other_patches_only": run_batched(model, processor, objects, others, batch_size),
        "all_patches": family_accuracy(objects, [a for s, a in zip(samples, clean["answers"])
                                                 if s.family in OBJECT_FAMILIES]),
    }

    budget = max(1, round(tokens * 64 / 576))
    report["pruned_11pct"] = {"keep": budget}
    # the pre-LLM methods renumber the kept tokens' positions, as their reference code does; the last row keeps
    # the original positions instead, to show what the model reads from positions rather than from features
    for label, name, options in (("random", "random", {}), ("pool", "pool", {}), ("fastervlm", "fastervlm", {}),
                                 ("visionzip", "visionzip", {}), ("divprune", "divprune", {}),
                                 ("fastervlm, original positions", "fastervlm", {"positions": "original"})):
        pruner = mmprune.get(name, keep=budget, **options)
        out = evaluate(model, processor, samples, pruner=pruner, batch_size=batch_size, progress=label)
        report["pruned_11pct"][label] = {"overall": out["accuracy"], **out["families"]}
    return report


def markdown(report: dict) -> str:
    families = list(synthetic.FAMILIES)
    pct = lambda v: f"{100 * v:.1f}"
    lines = ["| | overall | " + " | ".join(families) + " |", "|---" * (len(families) + 2) + "|"]
    for label, key in (("accuracy (%)", "accuracy"), ("noise image (%)", "noise_image")):
        row = report[key]
        lines.append(f"| {label} | {pct(row['overall'])} | " + " | ".join(pct(row[f]) for f in families) + " |")
    lines.append("| chance (%) | | " + " | ".join(pct(report["chance"][f]) for f in families) + " |")
    pruned = report["pruned_11pct"]
    for name, row in pruned.items():
        if name != "keep":
            lines.append(f"| {name} @ {pruned['keep']} tokens (%) | {pct(row['overall'])} | "
                         + " | ".join(pct(row[f]) for f in families) + " |")
    cls, rnd, loc = report["cls_top25"], report["random_25"], report["locality"]
    lines += [
        "",
        "| property | value |",
        "|---|---|",
        f"| relevant objects with a patch in the top 25% by [CLS] attention | {pct(cls['objects_covered'])}% |",
        f"| ... with 25% random patches | {pct(rnd['objects_covered'])}% |",
        f"| relevant patches in the top 25% by [CLS] attention | {pct(cls['patches_kept'])}% |",
        f"| ... with 25% random patches | {pct(rnd['patches_kept'])}% |",
        f"| object-attribute questions, all patches | {pct(loc['all_patches']['accuracy'])}% |",
        f"| ... only the object's own patches | {pct(loc['object_patches_only']['accuracy'])}% |",
        f"| ... every patch except those the objects touch | {pct(loc['other_patches_only']['accuracy'])}% |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHIPPED_MODEL))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder to write report.json into (created if missing; default: "
                                                  "the model folder)")
    args = p.parse_args(argv)
    report = measure(args.model, args.n, args.seed)
    print(markdown(report))
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {out / 'report.json'}")


if __name__ == "__main__":
    main()
