"""The `keep` budget: how many visual tokens of one image survive.

An ``int`` is a count of tokens kept per image; a ``float`` in (0, 1] is the fraction of the image's tokens kept.
Both forms are validated when a method is built (the stats record the form given) and resolved to a count per
image once the image's token count is known (Qwen2-VL images have a variable count, so a fraction is the only
portable form there).
"""

from __future__ import annotations

import math

ALLOWED = "an int >= 1 (tokens kept per image) or a float in (0, 1] (fraction of each image's tokens kept)"


def validate_keep(keep: object) -> int | float:
    """Raise ``ValueError`` naming ``keep`` unless it is a valid budget; return it unchanged."""
    # bool is an int subclass; `keep=True` is a bug in the caller, not a budget of one token.
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r} is not a valid budget: expected {ALLOWED}")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep={keep!r} is out of range: expected {ALLOWED}")
        return keep
    if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep!r} is out of range: expected {ALLOWED}")
    return keep


def resolve_keep(keep: int | float, num_tokens: int) -> int:
    """Number of tokens kept out of ``num_tokens``.

    A fraction rounds to the nearest count (``round(keep * N)``, the convention of FasterVLM's ``576 * (1 - R)``
    and DivPrune's ``round(ratio * N)``). A budget that resolves to zero tokens or to more tokens than the image has
    is an error, never a silent clamp.
    """
    validate_keep(keep)
    if isinstance(keep, int):
        if keep > num_tokens:
            raise ValueError(
                f"keep={keep} asks for more tokens than the image has ({num_tokens} visual tokens): "
                f"expected an int in [1, {num_tokens}] or a float in (0, 1]"
            )
        return keep
    count = int(round(keep * num_tokens))
    if count < 1:
        raise ValueError(
            f"keep={keep!r} keeps 0 of the image's {num_tokens} visual tokens: "
            f"use a fraction >= {0.5 / num_tokens:.4g} or an int >= 1"
        )
    return count
