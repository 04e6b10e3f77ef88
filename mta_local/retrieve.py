"""Choose the anchors most similar to a user and their merge weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnchorChoice:
    """One selected anchor: its id, cosine similarity to the user and merge weight."""

    anchor_id: str
    similarity: float
    weight: float


def cosine_similarities(user: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Return cosine(user, anchor) for every row of ``anchors`` (shape (V, dim))."""
    user = np.asarray(user, dtype=np.float64)
    anchors = np.asarray(anchors, dtype=np.float64)
    norms = np.linalg.norm(anchors, axis=1) * np.linalg.norm(user)
    return anchors @ user / np.maximum(norms, 1e-12)


def merge_weights(similarities: list[float]) -> list[float]:
    """Return alpha_i = sim_i / sum_j sim_j, so the most similar anchor gets the largest weight.

    Negative similarities are clipped to 0 first; if all are 0, the weights are equal.
    """
    clipped = [max(float(s), 0.0) for s in similarities]
    total = sum(clipped)
    if total <= 0.0:
        logger.warning("no selected anchor has a positive similarity; merging with equal weights")
        return [1.0 / len(clipped)] * len(clipped)
    return [s / total for s in clipped]


def select_anchors(user: np.ndarray, anchors: np.ndarray, anchor_ids: list[str], top_k: int) -> list[AnchorChoice]:
    """Return the top_k anchors by cosine similarity, most similar first (ties: lower id first)."""
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    similarities = cosine_similarities(user, anchors)
    order = sorted(range(len(anchor_ids)), key=lambda i: (-similarities[i], anchor_ids[i]))[:top_k]
    weights = merge_weights([similarities[i] for i in order])
    return [AnchorChoice(anchor_ids[i], float(similarities[i]), w) for i, w in zip(order, weights)]
