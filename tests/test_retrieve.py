import numpy as np
import pytest

from mta_local.bank import choose_anchors
from mta_local.retrieve import cosine_similarities, select_anchors


def test_select_anchors_orders_by_similarity():
    anchors = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    user = np.array([0.8, 0.6])

    chosen = select_anchors(user, anchors, ["a", "b", "c"], top_k=2)

    assert [c.anchor_id for c in chosen] == ["b", "a"]
    assert chosen[0].weight > chosen[1].weight
    assert sum(c.weight for c in chosen) == pytest.approx(1.0)
    assert chosen[0].similarity == pytest.approx(0.96)


def test_select_anchors_breaks_ties_by_id():
    anchors = np.array([[1.0, 0.0], [1.0, 0.0]])

    chosen = select_anchors(np.array([1.0, 0.0]), anchors, ["z", "m"], top_k=1)

    assert chosen[0].anchor_id == "m"


def test_cosine_ignores_vector_length():
    values = cosine_similarities(np.array([2.0, 0.0]), np.array([[5.0, 0.0], [0.0, 3.0]]))

    assert values == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize(
    "counts, labels, min_items, expected",
    [
        # the user with the most items in each cluster
        ([5, 12, 11, 20], [0, 0, 1, 1], 11, [(0, "u1"), (1, "u3")]),
        # ties go to the smaller user id
        ([12, 12, 3, 3], [0, 0, 1, 1], 1, [(0, "u0"), (1, "u2")]),
        # a cluster without a large enough user gets no anchor
        ([12, 3, 4, 5], [0, 0, 1, 1], 11, [(0, "u0")]),
    ],
)
def test_choose_anchors(counts, labels, min_items, expected):
    user_ids = [f"u{i}" for i in range(len(counts))]

    assert choose_anchors(user_ids, counts, np.array(labels), min_items) == expected
