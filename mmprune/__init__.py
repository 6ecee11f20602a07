"""mmprune: training-free visual token pruning for multimodal LLMs on stock Hugging Face models.

    import mmprune
    pruner = mmprune.get("fastervlm", keep=64)
    with pruner.attach(model):
        out = model.generate(**inputs, max_new_tokens=32)
    print(pruner.stats)
"""

from mmprune.budget import resolve_keep, validate_keep
from mmprune.methods import PreLLMPruner, Pruner
from mmprune.registry import METHODS, available, get

__version__ = "0.1.0"

__all__ = ["METHODS", "PreLLMPruner", "Pruner", "available", "get", "resolve_keep", "validate_keep"]
