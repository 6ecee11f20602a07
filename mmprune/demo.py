"""``make demo``: prune a VLM offline, end to end, through the CLI's own code path.

Until the project ships its trained model, the demo builds a tiny *random-weight* LLaVA (with a real processor and
tokenizer) and says so: the answers are meaningless, but every step a user takes with a real checkpoint runs for
real — processor, ``generate()``, pruning hooks, stats — and the kept tokens are drawn over the image.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from transformers.utils import logging as hf_logging

import mmprune
from mmprune.cli import load, run_once
from mmprune.zoo.tiny_random import build_tiny_llava

METHODS = ("random", "fastervlm", "visionzip", "divprune")
KEEP = 16  # of 144 tokens: 11%, the 64/576 budget of LLaVA-1.5


def scene() -> Image.Image:
    image = Image.new("RGB", (96, 96), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse([8, 8, 36, 36], fill=(200, 30, 30))
    draw.rectangle([56, 50, 88, 82], fill=(30, 60, 200))
    draw.polygon([(20, 88), (36, 58), (52, 88)], fill=(40, 160, 60))
    return image


def draw_kept(image: Image.Image, kept: list[int], side: int, path: Path) -> None:
    """The image with every pruned patch greyed out."""
    out = image.copy()
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    cell = out.size[0] / side
    keep = set(kept)
    for index in range(side * side):
        if index not in keep:
            r, c = divmod(index, side)
            draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=(40, 40, 40, 170))
    Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB").resize((288, 288), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="folder for the PNGs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # saving the demo model would otherwise draw a progress bar

    print("NOTE: this demo runs a tiny RANDOM-WEIGHT LLaVA built on the fly (no download, no trained model yet);")
    print("      its answers are noise. With a real checkpoint use: mmprune run --model llava-hf/llava-1.5-7b-hf ...\n")
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load(str(build_tiny_llava(Path(tmp) / "tiny-llava")))
    image = scene()
    image.save(out / "scene.png")
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    prompt = "what is the colour of the circle ?"

    rows = [("unpruned", run_once(model, processor, mmprune.get("random", keep=1.0), image, prompt, 8))]
    for name in METHODS:
        result = run_once(model, processor, mmprune.get(name, keep=KEEP), image, prompt, 8)
        rows.append((name, result))
        draw_kept(image, result["kept"][0], side, out / f"kept_{name}.png")

    print(f"prompt: {prompt!r}   budget: keep={KEEP} of {side * side} visual tokens\n")
    print(f"{'method':<10} {'tokens':>10} {'selection ms':>13} {'generate s':>11}  answer")
    for name, r in rows:
        tokens = f"{r['visual_tokens_before']}->{r['visual_tokens_after']}"
        print(f"{name:<10} {tokens:>10} {r['selection_ms']:>13.2f} {r['generate_s']:>11.3f}  {r['answer']}")
    print(f"\nkept patches drawn in {out}/kept_<method>.png")


if __name__ == "__main__":  # pragma: no cover
    main()
