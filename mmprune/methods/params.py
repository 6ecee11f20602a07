"""Hyper-parameter declarations: a method's dataclass fields say what values they accept.

A field declared with :func:`param` carries a :class:`Check` (type and range) and a one-line help. The base
``Pruner`` validates every declared field when the method is built (``mmprune.get``), so a wrong type or an
out-of-range value fails there, with one line naming the method, the field, the value and what is allowed, instead
of deep inside ``generate``. Values that depend on the model (a layer beyond its depth) are checked at attach.
``mmprune methods NAME`` lists the fields from the same declarations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Check:
    """What a field accepts; ``allowed`` is the phrase error messages and the CLI show."""

    allowed: str = ""
    optional: bool = False  # None is also accepted

    def describe(self) -> str:
        return f"None or {self.allowed}" if self.optional else self.allowed

    def accepts(self, value: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def normalise(self, value: Any) -> Any:
        """The value as stored (e.g. an int given for a float field becomes a float)."""
        return value

    def check(self, value: Any) -> bool:
        return (self.optional and value is None) or self.accepts(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int(Check):
    low: int | None = None
    high: int | None = None

    def __post_init__(self) -> None:
        if not self.allowed:
            bounds = (f"an int >= {self.low}" if self.high is None else
                      f"an int in [{self.low}, {self.high}]" if self.low is not None else f"an int <= {self.high}")
            object.__setattr__(self, "allowed", bounds if (self.low, self.high) != (None, None) else "an int")

    def accepts(self, value: Any) -> bool:
        return _is_int(value) and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


@dataclass(frozen=True)
class Float(Check):
    """A real number in an interval; ints are accepted and stored as floats."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __post_init__(self) -> None:
        if not self.allowed:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            object.__setattr__(self, "allowed", f"a number in {left}{self.low:g}, {self.high:g}{right}")

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def normalise(self, value: Any) -> Any:
        return None if value is None else float(value)


@dataclass(frozen=True)
class Bool(Check):
    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", self.allowed or "True or False")

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Choice(Check):
    options: tuple = ()

    def __post_init__(self) -> None:
        if not self.allowed:
            object.__setattr__(self, "allowed", "one of " + ", ".join(repr(o) for o in self.options))

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.options


@dataclass(frozen=True)
class Layers(Check):
    """Decoder layers: a non-empty list of strictly increasing ints >= 1 (the model's depth is checked at attach)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", self.allowed or "a list of strictly increasing ints >= 1, e.g. [8, 16]")

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v >= 1 for v in value)
                and all(a < b for a, b in zip(value, value[1:])))

    def normalise(self, value: Any) -> Any:
        return None if value is None else list(value)


@dataclass(frozen=True)
class Instance(Check):
    """An object given to a method rather than a number (a model, a tokenizer), told by what it has: each of
    ``attributes``, and a ``__call__`` when ``callable``. Duck-typed, so any class shaped like the expected one
    passes; ``allowed`` should name that class."""

    attributes: tuple[str, ...] = ()
    callable: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None or isinstance(value, (str, bytes, int, float, bool)):
            return False
        return all(hasattr(value, name) for name in self.attributes) and (not self.callable or callable(value))


def param(default: Any, check: Check, help: str = "") -> Any:
    """A dataclass field with a declared check and help (see the module docstring)."""
    return field(default=default, metadata={"check": check, "help": help})


def invalid(method: str, name: str, value: Any, check: Check) -> ValueError:
    return ValueError(f"{method}: {name}={value!r} is not valid: expected {check.describe()}")
