"""The pre-LLM output-count contract: ``PreLLMPruner.output_count`` says, before the method runs, how many tokens its
``prune_image`` returns for an item's layout (a server such as vLLM reserves exactly that many placeholders before
the vision tower runs). Checked against ``prune_image`` itself for every registered method with a pre-LLM stage, on
every model family's image layouts and on a video."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PARAMS, keep_for, tiny_model

import mmprune
import tiny
from mmprune.methods.base import PreLLMPruner

PRE_LLM = [m for m, cls in sorted(mmprune.METHODS.items()) if issubclass(cls, PreLLMPruner)]
# two samples, three images of different sizes on the families whose sizes vary (see tiny.tokens_per_image)
IMAGES = [[3, ("img", 0), 4], [2, ("img", 1), 1, ("img", 2), 2]]
VIDEO = [[3, ("vid", 0), 4]]


# the layouts: one plain grid after [CLS] (LLaVA-1.5), grids with image-newline tokens (LLaVA-NeXT), grids of two
# sizes without [CLS] (Qwen2.5-VL)
LAYOUTS = ["llava", "llava_next", "qwen2_5_vl"]


def keeps(method: str) -> list:
    """A count whose pooling lattice is not exact on a 4x4 grid (7 -> 2x3) and a fraction; methods whose keep
    averages over decoder layers take the one budget the tiny models can meet."""
    if method == "none":
        return [1.0]
    if mmprune.METHODS[method].stage != "pre-llm":
        return [keep_for(method)]
    return [7, 0.3]


def recorded_counts(pruner, model, inputs) -> list[tuple]:
    """``(num_tokens, segments, modality, returned count)`` of every ``prune_image`` call of one forward."""
    seen = []
    original = pruner.prune_image

    def recording(item):
        selection = original(item)
        seen.append((item.num_tokens, list(item.segments), item.modality, selection.count))
        return selection

    pruner.prune_image = recording  # the engine calls the instance's prune_image
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    return seen


def check(method: str, family: str, samples: list, keep) -> None:
    cls = mmprune.METHODS[method]
    pruner = mmprune.get(method, keep=keep, **TINY_PARAMS.get(method, {}))
    seen = recorded_counts(pruner, tiny_model(family), tiny.batch(family, samples))
    assert seen, f"{method} pruned no item on {family}"
    for num_tokens, segments, modality, count in seen:
        predicted = pruner.output_count(num_tokens, segments, modality)
        if cls.variable_counts and predicted is None:
            continue
        assert predicted == count, (f"{method} keep={keep} on a {modality} of {num_tokens} tokens "
                                    f"({family}): output_count {predicted}, prune_image returned {count}")


@pytest.mark.parametrize("family", LAYOUTS)
@pytest.mark.parametrize("method", PRE_LLM)
def test_output_count_equals_prune_image_on_images(method, family):
    if not mmprune.METHODS[method].prunes("image") and not mmprune.METHODS[method].passes_through:
        pytest.skip(f"{method} takes no images")
    for keep in keeps(method):
        check(method, family, IMAGES, keep)


@pytest.mark.parametrize("method", [m for m in PRE_LLM if mmprune.METHODS[m].prunes("video")])
def test_output_count_equals_prune_image_on_a_video(method):
    for keep in keeps(method):
        check(method, "qwen2_5_vl", VIDEO, keep)


def test_only_methods_whose_content_decides_the_count_may_not_know_it():
    """``None`` ("not known before it runs") is reserved to ``variable_counts`` methods; pool's lattice is exact."""
    grid = [mmprune.media.Segment(0, 12, 12)]
    for method in (m for m in PRE_LLM if mmprune.METHODS[m].stage == "pre-llm"):
        count = mmprune.get(method, keep=1.0 if method == "none" else 16).output_count(144, grid)
        assert (count is None) == mmprune.METHODS[method].variable_counts, method
    assert mmprune.get("pool", keep=17).output_count(144, grid) == 16  # the 4x4 lattice
    assert mmprune.get("pool", keep=143).output_count(144, grid) == 132  # 11 x 12
    assert mmprune.get("fastervlm", keep=17).output_count(144, grid) == 17
    assert mmprune.get("evs", keep=16).output_count(144, grid) == 144  # images pass through whole
