"""How an answer is scored: ``exact`` (normalised string in the accepted answers), ``vqa`` (VQAv2 accuracy:
``min(1, matches / 3)`` over the annotators' answers), ``yes/no`` (the first word, yes or no, against the answer).

VQAv2's rule assumes ten annotators: an answer three of them gave is fully right. A sample with fewer than three
answers could then never score above ``len(answers) / 3``: with one or two reference answers a match with either
is full credit (exact match), with three or more it is VQAv2's rule.
"""

from __future__ import annotations

from mmprune.data.synthetic import normalize

METRICS = ("exact", "vqa", "yes/no")


def score(prediction: str, answers: list[str], metric: str = "exact") -> float:
    """The credit in [0, 1] a prediction earns."""
    if metric == "exact":
        return float(normalize(prediction) in {normalize(a) for a in answers})
    if metric == "vqa":
        matches = sum(normalize(prediction) == normalize(a) for a in answers)
        return min(1.0, matches / 3.0) if len(answers) >= 3 else float(matches > 0)
    if metric == "yes/no":
        words = normalize(prediction).split()
        first = words[0] if words else ""
        return float(first in ("yes", "no") and first == normalize(answers[0]))
    raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
