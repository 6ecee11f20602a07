"""Method registry: adding a method is one file in ``methods/`` and one line here."""

from __future__ import annotations

import difflib
from dataclasses import fields

from mmprune.methods import (
    CDPrunerPruner,
    ClusterPruner,
    DARTPruner,
    DivPrunePruner,
    DyCokePruner,
    EVSPruner,
    FasterVLMPruner,
    FastVPruner,
    FeatherPruner,
    FlashVLMPruner,
    FlowCutPruner,
    FoPruPruner,
    FrameFusionPruner,
    HiPrunePruner,
    HiREDPruner,
    HoloVPruner,
    IDPrunerPruner,
    MMTokPruner,
    NonePruner,
    PiToMePruner,
    PoolPruner,
    PruMergePlusPruner,
    PruMergePruner,
    PyramidDropPruner,
    Pruner,
    RandomPruner,
    RecoverablePruner,
    SCOPEPruner,
    SeatsPruner,
    SMSPruner,
    SparseVLMPruner,
    ToDREPruner,
    ToMePruner,
    UniformPruner,
    VTCCLSPruner,
    VisionDropPruner,
    VisionZipPruner,
    VisPrunerPruner,
    ZerothOrderPruner,
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
        CDPrunerPruner,
        IDPrunerPruner,
        SCOPEPruner,
        MMTokPruner,
        FlashVLMPruner,
        RecoverablePruner,
        ZerothOrderPruner,
        FastVPruner,
        PyramidDropPruner,
        FeatherPruner,
        DARTPruner,
        ToDREPruner,
        VisionDropPruner,
        SparseVLMPruner,
        EVSPruner,
        DyCokePruner,
        FrameFusionPruner,
        SeatsPruner,
        ToMePruner,
        ClusterPruner,
        VTCCLSPruner,
        PiToMePruner,
        SMSPruner,
        HoloVPruner,
        HiREDPruner,
        HiPrunePruner,
        FoPruPruner,
        VisPrunerPruner,
        PruMergePruner,
        PruMergePlusPruner,
        FlowCutPruner,
    )
}


def available() -> list[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)


def resolve_name(name: object) -> str:
    """The registered name for ``name`` (case-insensitive); ``ValueError`` with the closest names otherwise."""
    if isinstance(name, str) and name.lower() in METHODS:
        return name.lower()
    close = difflib.get_close_matches(str(name).lower(), available(), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(f"unknown method {name!r}{hint}: expected one of {', '.join(available())}")


def parameters(cls: type[Pruner]) -> list[str]:
    """The hyper-parameters (init fields) of a method class, in declaration order (``keep_audio`` only for methods
    that prune audio)."""
    return [f.name for f in fields(cls) if f.init and (f.name != "keep_audio" or cls.prunes("audio"))]


def get(name: str, **params) -> Pruner:
    """A method instance; ``params`` are its dataclass fields (``keep``, ``positions``, method hyper-parameters).
    Every field's type and range is checked here (``ValueError`` naming the field, the value and what is allowed)."""
    name = resolve_name(name)
    cls = METHODS[name]
    allowed = parameters(cls)
    # keep_audio on a method without audio: the class says which methods prune audio
    unknown = [key for key in params if key not in allowed and key != "keep_audio"]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}: unknown parameter {unknown[0]!r}{hint}; its parameters are {', '.join(allowed)}")
    return cls(**params)
