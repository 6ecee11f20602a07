"""Seeing what was kept: an image with its pruned token cells greyed out, drawn from ``pruner.stats``.

Every family records each image's token layout in ``stats`` as ``segments`` (``[start, rows, cols, newline]``
grids: one for LLaVA-1.5 and Qwen2-VL, the base grid and the high-resolution grid with its newline tokens for
LLaVA-NeXT) and the final kept indices. A grid spans the whole image as the processor resized it (LLaVA-NeXT's
high-resolution grid covers the unpadded image; Qwen's grid follows the image's aspect), so each cell maps to a
rectangle of the image given here. A processor that centre-crops (CLIP's for LLaVA-1.5 checkpoints) shows the model
only the central square: pass that crop to see the cells at their place.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from mmprune.engine.session import LISTS, final_kept

DROPPED = (20, 20, 20, 190)  # RGBA over a pruned cell
TITLE_HEIGHT = 14


def grid_segments(stats: dict, sample: int, image: int, modality: str = "image") -> list[list]:
    """The patch grids (no 1x1 [CLS] or newline-only segments) of one item: an image's largest last, a video's in
    time order (one per temporal grid)."""
    try:
        entry = stats["samples"][sample][LISTS[modality]][image]
    except (IndexError, KeyError, TypeError):
        raise ValueError(f"stats hold no {modality} {image} of sample {sample}") from None
    grids = [s for s in entry["segments"] if s[1] * s[2] > 1]
    if not grids:
        raise ValueError(f"{modality} {image} of sample {sample} has no patch grid in stats")
    return grids if modality == "video" else sorted(grids, key=lambda s: s[1] * s[2])


def kept_cells(stats: dict, sample: int = 0, image: int = 0, segment: int = -1,
               modality: str = "image") -> tuple[int, int, set]:
    """``(rows, cols, {(row, col) kept})`` of one grid of one item: for an image, by default its largest (the
    high-resolution one on LLaVA-NeXT); for a video, ``segment`` is the temporal grid. Newline tokens are not
    cells."""
    start, rows, cols, newline = grid_segments(stats, sample, image, modality)[segment]
    stride = cols + int(bool(newline))
    cells = set()
    for index in final_kept(stats, modality)[sample][image]:
        local = index - start
        if 0 <= local < rows * stride and local % stride < cols:
            cells.add(divmod(local, stride))
    return rows, cols, cells


def draw_kept(picture: Image.Image, stats: dict, sample: int = 0, image: int = 0, segment: int = -1,
              title: str | None = None, scale: int = 1, modality: str = "image") -> Image.Image:
    """``picture`` (the image given to the processor, or a video frame) with the cells of pruned tokens greyed out.

    ``sample``/``image`` pick the item in ``stats`` (``pruner.stats`` after a forward; ``modality="video"`` for
    videos); ``segment`` picks one of its grids (default: an image's largest; for a video, the temporal grid the
    frame belongs to). ``title`` is written in a band above the image; ``scale`` enlarges small images (nearest
    neighbour) before drawing.
    """
    rows, cols, cells = kept_cells(stats, sample, image, segment, modality)
    base = picture.convert("RGBA")
    if scale != 1:
        base = base.resize((base.width * scale, base.height * scale), Image.NEAREST)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for row in range(rows):
        for col in range(cols):
            if (row, col) not in cells:
                box = cell_box(base.size, rows, cols, row, col)
                draw.rectangle(box, fill=DROPPED)
    out = Image.alpha_composite(base, overlay).convert("RGB")
    if title is None:
        return out
    titled = Image.new("RGB", (out.width, out.height + TITLE_HEIGHT), (255, 255, 255))
    titled.paste(out, (0, TITLE_HEIGHT))
    ImageDraw.Draw(titled).text((2, 1), title, fill=(0, 0, 0))
    return titled


def cell_box(size: tuple[int, int], rows: int, cols: int, row: int, col: int) -> tuple[int, int, int, int]:
    """Pixel rectangle (inclusive) of grid cell ``(row, col)`` over an image of ``size``."""
    width, height = size
    x0, x1 = round(col * width / cols), round((col + 1) * width / cols) - 1
    y0, y1 = round(row * height / rows), round((row + 1) * height / rows) - 1
    return x0, y0, x1, y1


def describe(stats: dict, sample: int = 0, image: int = 0, modality: str = "image") -> str:
    """A title: method, budget, kept tokens of the item (and merged ones)."""
    entry = stats["samples"][sample][LISTS[modality]][image]
    kept = len(final_kept(stats, modality)[sample][image])
    merged = f", {entry['merged']} merged" if entry.get("merged") else ""
    return f"{stats['method']} keep={stats['keep']:g}: {kept}/{entry['before']} tokens{merged}"
