import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

FAMILIES = list(tiny.BUILDERS)
_models: dict[str, torch.nn.Module] = {}


def tiny_model(family: str) -> torch.nn.Module:
    if family not in _models:
        _models[family] = tiny.BUILDERS[family]()
    return _models[family]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
