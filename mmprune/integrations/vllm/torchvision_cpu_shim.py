"""Lets the CUDA ``torchvision`` wheel import on a CPU-only torch (test environments only; ``make vllm`` installs it).

vLLM's LLaVA imports transformers' Pixtral image processor, which imports ``torchvision``. On a machine that reaches
only the default package index, ``torchvision`` is the CUDA build: its ``_C`` extension needs ``libtorch_cuda.so`` and
fails to load, and ``torchvision._meta_registrations`` then registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms``, ops nobody defined, so ``import torchvision`` raises "operator torchvision::nms does not exist".
Defining the two schemas first lets ``import torchvision`` finish with its pure-Python transforms (``_has_ops()`` is
then False; nothing on vLLM's CPU LLaVA path calls the compiled ops).

``make vllm`` installs this file into the vLLM virtualenv's site-packages, with a ``.pth`` line that calls
:func:`install`, only when ``import torchvision`` fails there (a torchvision whose ``_C`` loads defines the namespace
itself, and a second definition would break it). It is self-contained, since it runs at interpreter start-up, and
:func:`install` only adds a meta-path hook: torch is imported when, and only if, something imports ``torchvision``.
"""
from __future__ import annotations

import sys

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES = []  # a torch.library.Library drops its definitions when collected: keep it for the process


class _DefineOpsFirst:
    """A meta-path finder that finds nothing: on the first ``import torchvision`` it defines the missing schemas."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_schemas()
        return None


def define_schemas() -> None:
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        library.define(schema)
    _LIBRARIES.append(library)


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _DefineOpsFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _DefineOpsFirst())
