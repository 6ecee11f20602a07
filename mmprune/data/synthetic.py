"""Synthetic visual QA: scenes of simple objects, with questions that stress what token pruning loses.

Every sample is a pure function of ``(seed, index)`` (numpy's ``default_rng([seed, index, stream])``), so a
benchmark of N questions is the same on every machine. Scenes hold 1-5 objects (4 shapes x 5 colours x 2 sizes,
each colour+shape pair at most once, so "the red circle" names one object) on a plain or cluttered grey background;
objects may carry a noise texture. Question families:

=========  ==============================================================  =====================
family     asks                                                            answers
=========  ==============================================================  =====================
attribute  colour / shape / size of a named large object                   a colour, shape, size
count      how many objects (of a colour, of a shape)                      0-5
exist      is there a <colour> <shape> (half absent, mostly near misses)   yes / no
relation   is A left or right of (above or below) B                        left/right/above/below
location   which quadrant / which row (third) an object is in             "top left", "middle", ...
small      colour / shape of a small object (one or two patches)           a colour or shape
border     colour / shape of an object touching the image edge (60% top)   a colour or shape
=========  ==============================================================  =====================

Each sample carries the boxes of the objects its answer depends on (``boxes``), so a benchmark can count how many
relevant patches a pruning method kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 35),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 40),
    "purple": (145, 55, 195),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = {"small": (9, 11), "large": (17, 23)}  # side in pixels at 96 px; scaled with the image size
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
ROWS = ("top", "middle", "bottom")
EDGES = ("top", "bottom", "left", "right")
FAMILIES = ("attribute", "count", "exist", "relation", "location", "small", "border")
BASE_SIZE = 96


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive end

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def edges(self, image_size: int) -> list[str]:
        x0, y0, x1, y1 = self.box
        found = {"top": y0 == 0, "bottom": y1 == image_size, "left": x0 == 0, "right": x1 == image_size}
        return [edge for edge in EDGES if found[edge]]


@dataclass
class Scene:
    objects: list[Obj]
    image: Image.Image
    cluttered: bool

    @property
    def size(self) -> int:
        return self.image.size[0]


@dataclass
class Sample:
    image: Image.Image
    question: str
    answers: list[str]  # the first is canonical; all are accepted
    family: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # objects the answer depends on
    index: int = 0
    seed: int = 0
    metric: str = "exact"  # how answers are scored: see mmprune.data.metrics

    def to_json(self) -> dict:
        return {"question": self.question, "answers": self.answers, "family": self.family,
                "boxes": [list(b) for b in self.boxes], "index": self.index, "seed": self.seed,
                "metric": self.metric}


# --- scenes -------------------------------------------------------------------------------------------------------

def _place(rng, side: int, size: int, taken: list[tuple], edge: str | None, gap: int) -> tuple | None:
    for _ in range(60):
        x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        if edge == "top":
            y0 = 0
        elif edge == "bottom":
            y0 = size - side
        elif edge == "left":
            x0 = 0
        elif edge == "right":
            x0 = size - side
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + gap <= t[0] or t[2] + gap <= box[0] or box[3] + gap <= t[1] or t[3] + gap <= box[1]
               for t in taken):
            return box
    return None


def _background(rng, size: int, cluttered: bool) -> np.ndarray:
    level = rng.uniform(25, 205)
    tint = rng.uniform(-10, 10, size=3)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = level + tint
    if cluttered:
        canvas += rng.normal(0, rng.uniform(6, 16), size=(size, size, 1))  # grey grain
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(4, 12))):  # grey strokes and specks: clutter with no colour
            grey = int(np.clip(level + rng.choice([-1, 1]) * rng.uniform(25, 60), 0, 255))
            points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
            if rng.random() < 0.6:
                draw.line(points, fill=(grey,) * 3, width=int(rng.integers(1, 3)))
            else:
                r = int(rng.integers(1, 3))
                x, y = points[0]
                draw.ellipse([x - r, y - r, x + r, y + r], fill=(grey,) * 3)
        canvas = np.asarray(image, np.float32)
    return canvas


def _draw(canvas: np.ndarray, obj: Obj, rng) -> None:
    x0, y0, x1, y1 = obj.box
    side = x1 - x0
    mask_image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask_image)
    if obj.shape == "circle":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
    elif obj.shape == "square":
        inset = max(1, side // 10)
        draw.rectangle([inset, inset, side - 1 - inset, side - 1 - inset], fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(side / 2, 0), (side - 1, side - 1), (0, side - 1)], fill=255)
    else:  # cross
        arm = max(2, round(side / 3))
        lo = (side - arm) // 2
        draw.rectangle([lo, 0, lo + arm - 1, side - 1], fill=255)
        draw.rectangle([0, lo, side - 1, lo + arm - 1], fill=255)
    mask = np.asarray(mask_image, np.float32)[..., None] / 255.0
    colour = np.array(COLOURS[obj.colour], np.float32) + rng.uniform(-18, 18, size=3)
    fill = np.broadcast_to(colour, (side, side, 3)).copy()
    if rng.random() < 0.5:  # textured object
        fill += rng.normal(0, 12, size=(side, side, 1))
    region = canvas[y0:y1, x0:x1]
    region[:] = region * (1 - mask) + fill * mask


def make_scene(rng, size: int = BASE_SIZE, n_objects: int | None = None, cluttered: bool | None = None,
               small: int = 0, border: str | None = None, repeat_colour: bool = False) -> Scene:
    """A random scene. ``small``: how many objects are forced small; ``border``: an edge the first object
    touches; ``repeat_colour``: favour repeated colours (for counting)."""
    scale = size / BASE_SIZE
    n = int(n_objects if n_objects is not None else rng.integers(1, 6))
    cluttered = bool(rng.random() < 0.5) if cluttered is None else cluttered
    pairs: set[tuple[str, str]] = set()
    objects: list[Obj] = []
    colours = list(COLOURS)
    palette = list(rng.choice(colours, size=2, replace=False)) if repeat_colour else colours
    for i in range(n):
        for _ in range(50):
            colour = str(rng.choice(palette if rng.random() < 0.8 else colours))
            shape = str(rng.choice(SHAPES))
            if (colour, shape) not in pairs:
                break
        else:
            continue
        size_name = "small" if i < small else ("large" if small or rng.random() < 0.6 else "small")
        lo, hi = SIZES[size_name]
        side = int(round(rng.integers(lo, hi + 1) * scale))
        box = _place(rng, side, size, [o.box for o in objects], border if i == 0 else None, gap=int(3 * scale))
        if box is None:
            continue
        pairs.add((colour, shape))
        objects.append(Obj(shape, colour, size_name, box))
    return render(objects, size, cluttered, rng)


def render(objects: list[Obj], size: int, cluttered: bool, rng) -> Scene:
    """Draw ``objects`` on a fresh background; the same rng state draws the same background, colour jitter and
    textures for objects of the same boxes, so two renders differ only where the objects do."""
    canvas = _background(rng, size, cluttered)
    for obj in objects:
        _draw(canvas, obj, rng)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return Scene(objects, image, cluttered)


def hard_negative(rng, scene: Scene) -> list[Obj] | None:
    """The scene's objects with one detail changed, for contrastive training with hard negatives (as NegCLIP):
    two objects' colours swapped (a quarter of the time), else one object's shape (60%) or colour (15%)
    replaced, keeping every colour+shape pair unique. Shapes get most of the share because they are what a small
    CLIP learns last (colours are told apart early). None for an empty scene."""
    objects = list(scene.objects)
    if not objects:
        return None
    pairs = {(o.colour, o.shape) for o in objects}
    kind = rng.random()
    if kind < 0.25 and len(objects) >= 2:
        i, j = (int(v) for v in rng.choice(len(objects), size=2, replace=False))
        a, b = objects[i], objects[j]
        swapped = {(b.colour, a.shape), (a.colour, b.shape)}
        if a.colour != b.colour and not swapped & (pairs - {(a.colour, a.shape), (b.colour, b.shape)}):
            objects[i] = Obj(a.shape, b.colour, a.size, a.box)
            objects[j] = Obj(b.shape, a.colour, b.size, b.box)
            return objects
    i = int(rng.integers(len(objects)))
    target = objects[i]
    if kind < 0.85:
        options = [Obj(s, target.colour, target.size, target.box) for s in SHAPES if (target.colour, s) not in pairs]
    else:
        options = [Obj(target.shape, c, target.size, target.box) for c in COLOURS if (c, target.shape) not in pairs]
    if not options:
        return None
    objects[i] = options[int(rng.integers(len(options)))]
    return objects


def caption(scene: Scene) -> str:
    """What CLIP-style training pairs with the image: every object, in reading order, with size and place."""
    size = scene.size

    def third(v: float) -> int:
        return min(2, int(3 * v / size))

    ordered = sorted(scene.objects, key=lambda o: (third(o.centre[1]), o.centre[0]))
    parts = [f"{o.size} {o.colour} {o.shape} {ROWS[third(o.centre[1])]} {('left', 'centre', 'right')[third(o.centre[0])]}"
             for o in ordered]
    return " . ".join(parts) + " ." if parts else "nothing ."


# --- questions ----------------------------------------------------------------------------------------------------

def _unique(objects: list[Obj], key: str, value: str) -> bool:
    return sum(getattr(o, key) == value for o in objects) == 1


def _describe(rng, target: Obj, objects: list[Obj], prefix: str = "") -> list[tuple[str, list[str]]]:
    """Questions asking the colour or shape of ``target`` by a property that names it uniquely."""
    out = []
    pool = [o for o in objects if not prefix or o.size == target.size]
    if _unique(pool, "shape", target.shape):
        out.append((f"what color is the {prefix}{target.shape} ?", [target.colour]))
    if _unique(pool, "colour", target.colour):
        out.append((f"what shape is the {prefix}{target.colour} object ?", [target.shape]))
    return out


def ask(rng, scene: Scene, family: str) -> tuple[str, list[str], list[Obj]] | None:
    """One question of ``family`` about ``scene``: (question, answers, objects it depends on), or None when the
    scene cannot support the family."""
    objects, size = scene.objects, scene.size
    if not objects and family != "exist":
        return None
    if family == "attribute":
        # colour, shape and size questions in equal shares; colour/shape about a large object (small ones have
        # their own family), size about any object so that "small" and "large" are equally likely answers
        kind = str(rng.choice(["describe", "size"]))
        large = [o for o in objects if o.size == "large"]
        if kind == "describe" and large:
            target = large[int(rng.integers(len(large)))]
            options = _describe(rng, target, objects)
            if options:
                question, answers = options[int(rng.integers(len(options)))]
                return question, answers, [target]
        by_size = {name: [o for o in objects if o.size == name] for name in SIZES}
        pool = by_size[str(rng.choice([name for name in SIZES if by_size[name]]))]
        target = pool[int(rng.integers(len(pool)))]
        return f"what size is the {target.name} ?", [target.size], [target]
    if family == "count":
        kind = rng.choice(["all", "colour", "shape"])
        if kind == "all":
            chosen, question = objects, "how many objects are there ?"
        elif kind == "colour":
            colour = str(rng.choice([o.colour for o in objects] + list(COLOURS)))
            chosen = [o for o in objects if o.colour == colour]
            question = f"how many {colour} objects are there ?"
        else:
            shape = str(rng.choice([o.shape for o in objects] + list(SHAPES)))
            chosen = [o for o in objects if o.shape == shape]
            question = f"how many {PLURAL[shape]} are there ?"
        return question, [str(len(chosen)), NUMBERS[len(chosen)]], chosen
    if family == "exist":
        present = {(o.colour, o.shape) for o in objects}
        if objects and rng.random() < 0.5:
            target = objects[int(rng.integers(len(objects)))]
            return f"is there a {target.colour} {target.shape} ?", ["yes"], [target]
        # near misses first: a colour or a shape that is in the scene, in a pair that is not
        near = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present
                and any(c == o.colour or s == o.shape for o in objects)]
        far = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        pool = near if near and rng.random() < 0.8 else far
        colour, shape = pool[int(rng.integers(len(pool)))]
        return f"is there a {colour} {shape} ?", ["no"], []
    if family == "relation":
        pairs = []
        for a in objects:
            for b in objects:
                if a is b:
                    continue
                if a.box[2] <= b.box[0] or b.box[2] <= a.box[0]:
                    word = "left" if a.centre[0] < b.centre[0] else "right"
                    pairs.append((f"is the {a.name} left or right of the {b.name} ?", [word], [a, b]))
                if a.box[3] <= b.box[1] or b.box[3] <= a.box[1]:
                    word = "above" if a.centre[1] < b.centre[1] else "below"
                    pairs.append((f"is the {a.name} above or below the {b.name} ?", [word], [a, b]))
        return pairs[int(rng.integers(len(pairs)))] if pairs else None
    if family == "location":
        options = []
        for o in objects:
            cx, cy = o.centre
            if abs(cx - size / 2) >= size / 16 and abs(cy - size / 2) >= size / 16:
                quadrant = QUADRANTS[2 * int(cy > size / 2) + int(cx > size / 2)]
                options.append((f"which quadrant is the {o.name} in ?", [quadrant], [o]))
            row = int(3 * cy / size)
            if all(abs(cy - k * size / 3) >= size / 24 for k in (1, 2)):
                options.append((f"which row is the {o.name} in ?", [ROWS[min(row, 2)]], [o]))
        return options[int(rng.integers(len(options)))] if options else None
    if family == "small":
        small = [o for o in objects if o.size == "small"]
        options = [(q, a, [o]) for o in small for q, a in _describe(rng, o, objects, prefix="small ")]
        return options[int(rng.integers(len(options)))] if options else None
    if family == "border":
        edged = [o for o in objects if o.edges(size)]
        options = [(q, a, [o]) for o in edged for q, a in _describe(rng, o, objects)]
        return options[int(rng.integers(len(options)))] if options else None
    raise ValueError(f"unknown question family {family!r}; allowed: {', '.join(FAMILIES)}")


def scene_for(rng, family: str, size: int = BASE_SIZE) -> Scene:
    """A scene drawn so that ``family`` is well represented (small targets, border targets, repeated colours)."""
    if family == "small":
        return make_scene(rng, size, n_objects=int(rng.integers(2, 5)), small=int(rng.integers(1, 3)))
    if family == "border":
        edge = "top" if rng.random() < 0.6 else str(rng.choice(["bottom", "left", "right"]))
        return make_scene(rng, size, n_objects=int(rng.integers(1, 5)), border=edge)
    if family == "count":
        return make_scene(rng, size, repeat_colour=bool(rng.random() < 0.5))
    if family == "relation":
        return make_scene(rng, size, n_objects=int(rng.integers(2, 6)))
    return make_scene(rng, size)


def sample(seed: int, index: int, size: int = BASE_SIZE, families: tuple[str, ...] = FAMILIES) -> Sample:
    """Question ``index`` of the benchmark with ``seed``: families in turn, each on a scene drawn for it."""
    family = families[index % len(families)]
    rng = np.random.default_rng([seed, index, 0])
    while True:
        scene = scene_for(rng, family, size)
        asked = ask(rng, scene, family)
        if asked is not None:
            question, answers, objects = asked
            return Sample(scene.image, question, answers, family, [o.box for o in objects], index, seed)


def generate(n: int, seed: int = 0, size: int = BASE_SIZE) -> list[Sample]:
    """The first ``n`` questions of the benchmark with ``seed`` (balanced over the families)."""
    if n < 1:
        raise ValueError(f"synthetic benchmark size must be a positive integer, got {n}")
    return [sample(seed, i, size) for i in range(n)]


def normalize(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").replace(",", " ").split())


def is_correct(prediction: str, answers: list[str]) -> bool:
    return normalize(prediction) in {normalize(a) for a in answers}


def vocabulary() -> list[str]:
    """Every word the generator can write (questions, answers, captions), for a word-level tokenizer."""
    words = {"what", "color", "is", "the", "shape", "object", "size", "of", "how", "many", "objects", "are",
             "there", "a", "left", "or", "right", "above", "below", "which", "quadrant", "in", "row", "yes", "no",
             "describe", "image", "nothing", "centre", "?", ".", ":", "USER", "ASSISTANT"}
    words |= set(COLOURS) | set(SHAPES) | set(PLURAL.values()) | set(SIZES) | set(NUMBERS) | set(ROWS) | set(EDGES)
    words |= {w for q in QUADRANTS for w in q.split()} | {str(i) for i in range(len(NUMBERS))}
    return sorted(words)


def box_patches(box: tuple[int, int, int, int], image_size: int, grid: int, min_cover: float = 0.25) -> list[int]:
    """Row-major indices of the ``grid x grid`` patches that a box covers by at least ``min_cover`` of a patch's
    area (the patch with the largest overlap when none does, so every object has at least one patch)."""
    cell = image_size / grid
    x0, y0, x1, y1 = box
    overlap = {}
    for r in range(int(y0 // cell), min(grid, int(np.ceil(y1 / cell)))):
        for c in range(int(x0 // cell), min(grid, int(np.ceil(x1 / cell)))):
            w = min(x1, (c + 1) * cell) - max(x0, c * cell)
            h = min(y1, (r + 1) * cell) - max(y0, r * cell)
            if w > 0 and h > 0:
                overlap[r * grid + c] = w * h / cell**2
    covered = sorted(i for i, share in overlap.items() if share >= min_cover)
    return covered or [max(overlap, key=overlap.get)]
