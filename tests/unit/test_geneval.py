"""GenEval's checks (tdm_r1/rewards/geneval.py) on hand-made detections: which objects count, counting, colour,
relative position and exclusion clauses, and the partial score."""

import math

import numpy as np
import pytest

from tdm_r1.rewards.geneval import geneval_score, relative_position, select_objects


def box(x1, y1, x2, y2, conf=0.95):
    return np.array([x1, y1, x2, y2, conf], dtype=np.float32)


def det(*boxes):
    return [(b, None) for b in boxes]


def no_colors(found, cls):
    raise AssertionError("colour asked for a clause without one")


def test_select_objects_thresholds_and_orders_by_confidence():
    classes = ["cat", "dog"]
    cats = np.stack([box(0, 0, 1, 1, 0.5), box(0, 0, 2, 2, 0.95), box(0, 0, 3, 3, 0.2)])
    dogs = np.zeros((0, 5), np.float32)
    got = select_objects([cats, dogs], None, classes, tag="single_object")
    assert list(got) == ["cat"] and [float(b[4]) for b, _ in got["cat"]] == [pytest.approx(0.95), 0.5]
    counting = select_objects([cats, dogs], None, classes, tag="counting")  # counting prompts need 0.9
    assert [float(b[4]) for b, _ in counting["cat"]] == [pytest.approx(0.95)]


def test_relative_position():
    left, right = box(0, 0, 10, 10), box(30, 0, 40, 10)
    assert relative_position(left, right) == {"left of"} and relative_position(right, left) == {"right of"}
    top, bottom = box(0, 0, 10, 10), box(0, 40, 10, 50)
    assert relative_position(top, bottom) == {"above"} and relative_position(bottom, top) == {"below"}
    assert relative_position(box(0, 0, 10, 10), box(1, 1, 11, 11)) == set()  # overlapping: no relation
    assert relative_position(box(0, 0, 10, 10), box(40, 40, 50, 50)) == {"left of", "above"}


def test_counting_and_exclusion():
    meta = {"include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    assert geneval_score({"dog": det(box(0, 0, 1, 1), box(2, 2, 3, 3))}, meta, no_colors) == 1.0
    assert geneval_score({"dog": det(box(0, 0, 1, 1))}, meta, no_colors) == 0.5  # too few; exclusion holds
    three = {"dog": det(box(0, 0, 1, 1), box(2, 2, 3, 3), box(4, 4, 5, 5))}
    assert geneval_score(three, meta, no_colors) == 0.5  # enough, but 3 breaks "fewer than 3"
    assert math.isnan(geneval_score({}, {"prompt": "no clauses"}, no_colors))


def test_colour_clause_uses_the_most_confident_objects():
    meta = {"include": [{"class": "car", "count": 1, "color": "red"}]}
    objects = {"car": det(box(0, 0, 1, 1), box(2, 2, 3, 3, 0.5))}
    seen = []

    def colors(found, cls):
        seen.append((len(found), cls))
        return ["red"]

    assert geneval_score(objects, meta, colors) == 1.0 and seen == [(1, "car")]
    assert geneval_score(objects, meta, lambda found, cls: ["blue"]) == 0.0


def test_position_clause_refers_to_an_earlier_clause():
    meta = {
        "include": [
            {"class": "cat", "count": 1},
            {"class": "dog", "count": 1, "position": ["right of", 0]},
        ]
    }
    cat, dog_right, dog_left = box(0, 0, 10, 10), box(30, 0, 40, 10), box(-40, 0, -30, 10)
    assert geneval_score({"cat": det(cat), "dog": det(dog_right)}, meta, no_colors) == 1.0
    assert geneval_score({"cat": det(cat), "dog": det(dog_left)}, meta, no_colors) == 0.5
    assert geneval_score({"dog": det(dog_right)}, meta, no_colors) == 0.0  # no cat: nothing to be right of
