"""``make demo``: the shipped model answers benchmark questions unpruned and with three methods at an 11% budget.

No network: the model is the project's own small LLaVA (``mmprune/zoo/shapes_llava``, trained by
``python -m mmprune.zoo.train``), loaded with the stock HF classes. Prints a table (method, kept tokens, accuracy,
prefill time) and writes one PNG per method with the kept patches of the first image, its relevant objects
outlined and a title (method, budget, kept tokens, the answer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import ImageDraw

import mmprune
from mmprune.bench.accuracy import answer, evaluate
from mmprune.data import synthetic
from mmprune.viz import TITLE_HEIGHT, describe, draw_kept
from mmprune.zoo import SHIPPED_MODEL, load_shipped

METHODS = ("random", "fastervlm", "visionzip")
BUDGET = 64 / 576  # LLaVA-1.5's 64-token setting, as a share of the image's tokens


def draw_example(model, processor, pruner, example, path: Path, scale: int = 4) -> str:
    """Answer ``example`` with ``pruner`` attached and save its image with the pruned patches greyed out, the
    question's objects outlined in white and a title (method, budget, kept tokens, answer). Returns the answer."""
    result = answer(model, processor, [example.image], [example.question], pruner)
    reply = result["answers"][0]
    title = f"{describe(result['stats'])}; answer {reply!r}"
    picture = draw_kept(example.image, result["stats"], title=title, scale=scale)
    draw = ImageDraw.Draw(picture)
    for x0, y0, x1, y1 in example.boxes:
        draw.rectangle([x0 * scale - 2, y0 * scale - 2 + TITLE_HEIGHT, x1 * scale + 1, y1 * scale + 1 + TITLE_HEIGHT],
                       outline=(255, 255, 255), width=2)
    picture.save(path)
    return reply


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="folder for the PNGs")
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="model folder (default: the shipped model)")
    parser.add_argument("--questions", type=int, default=70, help="benchmark questions to answer (seed 0)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, processor = load_shipped(args.model)
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    keep = round(side * side * BUDGET)
    samples = synthetic.generate(args.questions, seed=0, size=vision.image_size)
    print(f"model: {args.model} (LLaVA architecture, {side * side} visual tokens per image)")
    print(f"{len(samples)} held-out questions of the synthetic benchmark (seed 0), budget {keep}/{side * side} "
          f"tokens ({100 * keep / (side * side):.0f}%)\n")

    first = samples[0]
    first.image.save(out / "image.png")
    print(f"example: {first.question!r} -> expected {first.answers[0]!r}")
    rows = []
    for name in ("none", *METHODS):
        pruner = None if name == "none" else mmprune.get(name, keep=keep)
        result = evaluate(model, processor, samples, pruner=pruner, timed=True)
        rows.append((name, side * side if pruner is None else keep, result))
        if pruner is not None:
            draw_example(model, processor, pruner, first, out / f"kept_{name}.png")
        print(f"  {name:<10} answers {result['answers'][0]!r}")

    print(f"\n{'method':<10} {'tokens':>6} {'accuracy':>9} {'prefill s':>10}")
    for name, tokens, result in rows:
        print(f"{name:<10} {tokens:>6} {100 * result['accuracy']:>8.1f}% {result['prefill_s']:>10.3f}")
    print(f"\nkept patches of the example drawn in {out}/kept_<method>.png (relevant objects outlined)")


if __name__ == "__main__":  # pragma: no cover
    main()
