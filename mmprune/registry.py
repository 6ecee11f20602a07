"""Method registry: adding a method is one file in ``methods/`` and one line here."""

from __future__ import annotations

from mmprune.methods import (
    DARTPruner,
    DivPrunePruner,
    FasterVLMPruner,
    FastVPruner,
    FeatherPruner,
    NonePruner,
    PoolPruner,
    PyramidDropPruner,
    Pruner,
    RandomPruner,
    SparseVLMPruner,
    ToDREPruner,
    UniformPruner,
    VisionDropPruner,
    VisionZipPruner,
)

METHODS: dict[str, type[Pruner]] = {
    cls.name: cls
    for cls in (
        NonePruner,
        RandomPruner,
        UniformPruner,
        PoolPruner,
        FasterVLMPruner,
        VisionZipPruner,
        DivPrunePruner,
        FastVPruner,
        PyramidDropPruner,
        FeatherPruner,
        DARTPruner,
        ToDREPruner,
        VisionDropPruner,
        SparseVLMPruner,
    )
}


def available() -> list[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)


def get(name: str, **params) -> Pruner:
    """A method instance; ``params`` are its dataclass fields (``keep``, ``positions``, method hyper-parameters)."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(available())}")
    cls = METHODS[name]
    try:
        return cls(**params)
    except TypeError as exc:  # an unknown keyword: name what the method does take
        from dataclasses import fields

        allowed = [f.name for f in fields(cls) if f.init]
        raise ValueError(f"{name}: {exc}; its parameters are {', '.join(allowed)}") from None
