"""lmms-eval's entry point (group ``lmms_eval.models``): tells lmms-eval that ``--model mmprune`` is
:class:`mmprune.integrations.lmms_eval.MMPrune`. lmms-eval loads every entry point whenever it imports its model
registry, so this module imports neither torch nor transformers; the model's module is imported only when chosen."""

from __future__ import annotations


def manifests() -> list:
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="mmprune", chat_class_path="mmprune.integrations.lmms_eval.MMPrune")]
