"""Users' own visual-QA data (POPE/GQA-style) as JSONL, one question per line:

    {"image": "images/0001.jpg", "question": "Is there a dog in the image?", "answers": ["yes"],
     "metric": "yes/no", "family": "pope-adversarial"}

``image`` is a path relative to the JSONL file (or absolute); ``answers`` a list (``"answer"``, one string, is
accepted too); ``metric`` one of ``exact``, ``vqa``, ``yes/no`` (default ``exact``); ``family`` groups questions in
the per-family tables (default ``"all"``); ``boxes`` (optional) ``[[x0, y0, x1, y1], ...]`` in pixels of the
original image enable relevant-patch recall. ``examples/tiny.jsonl`` is a runnable example.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mmprune.data.metrics import METRICS
from mmprune.data.synthetic import Sample


def load_jsonl(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        missing = [k for k in ("image", "question") if k not in row]
        if missing or ("answers" not in row and "answer" not in row):
            raise ValueError(f"{where}: needs 'image', 'question' and 'answers' (or 'answer'); missing "
                             f"{', '.join(missing + ([] if 'answers' in row or 'answer' in row else ['answers']))}")
        answers = row["answers"] if "answers" in row else [row["answer"]]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
        metric = row.get("metric", "exact")
        if metric not in METRICS:
            raise ValueError(f"{where}: metric {metric!r} is not one of {', '.join(METRICS)}")
        image_path = Path(row["image"])
        image_path = image_path if image_path.is_absolute() else path.parent / image_path
        try:
            image = Image.open(image_path).convert("RGB")
        except OSError as exc:
            raise ValueError(f"{where}: image {str(image_path)!r} cannot be read ({exc})") from None
        family = row.get("family", "all")
        if not isinstance(family, str) or not family:
            raise ValueError(f"{where}: 'family' must be a non-empty string, got {family!r}")
        boxes = row.get("boxes", [])
        if not isinstance(boxes, list) or not all(
                isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in b) and b[0] < b[2] and b[1] < b[3]
                for b in boxes):
            raise ValueError(f"{where}: 'boxes' must be a list of [x0, y0, x1, y1] pixel boxes with x0 < x1 and "
                             f"y0 < y1, got {boxes!r}")
        if not isinstance(row["question"], str):
            raise ValueError(f"{where}: 'question' must be a string, got {row['question']!r}")
        samples.append(Sample(image, row["question"], answers, family, [tuple(b) for b in boxes],
                              index=len(samples), metric=metric))
    if not samples:
        raise ValueError(f"data file {str(path)!r} holds no questions")
    return samples
