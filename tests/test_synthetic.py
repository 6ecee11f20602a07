"""The synthetic benchmark: deterministic by seed, balanced, every question answerable from its boxes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmprune.data import synthetic
from mmprune.zoo.builder import word_tokenizer


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = synthetic.generate(21, seed=3), synthetic.generate(21, seed=3), synthetic.generate(21, seed=4)
    assert [s.to_json() for s in a] == [s.to_json() for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert sum(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c)) == 0
    # a sample depends on (seed, index) only, not on how many were generated before it
    assert synthetic.sample(3, 20).to_json() == a[20].to_json()


def test_families_in_turn_with_boxes_inside_the_image():
    samples = synthetic.generate(140, seed=0)
    assert Counter(s.family for s in samples) == {f: 20 for f in synthetic.FAMILIES}
    for s in samples:
        assert s.image.size == (96, 96) and s.answers and s.question.endswith("?")
        for x0, y0, x1, y1 in s.boxes:
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        if s.family in ("attribute", "location", "small", "border"):
            assert len(s.boxes) == 1
        if s.family == "relation":
            assert len(s.boxes) == 2
        if s.family == "exist":
            assert len(s.boxes) == (s.answers == ["yes"])
        if s.family == "count":
            assert s.answers[0] == str(len(s.boxes))


def test_family_specific_scenes():
    samples = synthetic.generate(350, seed=1)
    small = [s for s in samples if s.family == "small"]
    assert all(max(b[2] - b[0] for b in s.boxes) <= 11 for s in small)
    border = [s for s in samples if s.family == "border"]
    assert all(b[0] == 0 or b[1] == 0 or b[2] == 96 or b[3] == 96 for s in border for b in s.boxes)
    tops = sum(s.boxes[0][1] == 0 for s in border)
    assert tops > len(border) / 2  # top rows in particular


def test_answers_match_the_geometry():
    for s in synthetic.generate(210, seed=2):
        if s.family == "relation":
            (a0, a1, a2, a3), (b0, b1, b2, b3) = s.boxes
            expected = {"left": a2 <= b0, "right": b2 <= a0, "above": a3 <= b1, "below": b3 <= a1}
            assert expected[s.answers[0]], s.question
        if s.family == "location" and "quadrant" in s.question:
            x0, y0, x1, y1 = s.boxes[0]
            row = "top" if (y0 + y1) / 2 < 48 else "bottom"
            col = "left" if (x0 + x1) / 2 < 48 else "right"
            assert s.answers[0] == f"{row} {col}"


def test_vocabulary_covers_every_question_answer_and_caption():
    tokenizer = word_tokenizer(synthetic.vocabulary())
    unk = tokenizer.unk_token_id
    rng = np.random.default_rng(0)
    texts = [f"{s.question} {' '.join(s.answers)}" for s in synthetic.generate(140, seed=5)]
    texts += [synthetic.caption(synthetic.make_scene(rng)) for _ in range(50)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids, text
        assert tokenizer.decode(ids) == text


def test_box_patches_by_hand():
    # 96 px, 12x12 grid of 8 px cells: a box over cells (1,1)-(2,2) fully and an eighth of column 3
    assert synthetic.box_patches((8, 8, 25, 24), 96, 12) == [13, 14, 25, 26]
    assert synthetic.box_patches((8, 8, 26, 24), 96, 12, min_cover=0.0) == [13, 14, 15, 25, 26, 27]
    assert synthetic.box_patches((0, 0, 3, 3), 96, 12) == [0]  # tiny box: the cell it overlaps most


def test_scoring_normalizes():
    assert synthetic.is_correct(" Top Left.", ["top left"])
    assert synthetic.is_correct("two", ["2", "two"])
    assert not synthetic.is_correct("top", ["top left"])


def test_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        synthetic.generate(0)
    with pytest.raises(ValueError, match="unknown question family 'colour'; allowed: attribute"):
        synthetic.ask(np.random.default_rng(0), synthetic.make_scene(np.random.default_rng(0)), "colour")


def test_render_is_deterministic_and_twins_differ_only_where_the_objects_do():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        scene = synthetic.make_scene(rng)
        twin = synthetic.hard_negative(rng, scene)
        if twin is None:
            continue
        changed = [(a, b) for a, b in zip(scene.objects, twin) if a != b]
        assert 1 <= len(changed) <= 2 and all(a.box == b.box and a.size == b.size for a, b in changed)
        assert len({(o.colour, o.shape) for o in twin}) == len(twin)  # names stay unique
        assert synthetic.caption(synthetic.render(twin, 96, scene.cluttered, rng)) != synthetic.caption(scene)
        base, again = (synthetic.render(scene.objects, 96, scene.cluttered, np.random.default_rng(seed))
                       for _ in range(2))
        assert np.array_equal(np.asarray(base.image), np.asarray(again.image))
        other = synthetic.render(twin, 96, scene.cluttered, np.random.default_rng(seed))
        diff = np.any(np.asarray(base.image) != np.asarray(other.image), axis=-1)
        inside = np.zeros_like(diff)
        for a, _ in changed:
            x0, y0, x1, y1 = a.box
            inside[y0:y1, x0:x1] = True
        assert diff.any() and not (diff & ~inside).any()


def test_hard_negative_of_an_empty_scene_is_none():
    scene = synthetic.make_scene(np.random.default_rng(0), n_objects=0)
    assert synthetic.hard_negative(np.random.default_rng(0), scene) is None
