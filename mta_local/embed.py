"""Embed history items and users with a local sentence-transformers model."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from functools import lru_cache

import numpy as np

from .errors import ModelNotFoundError
from .models import resolve_embedder

logger = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def load_embedder(name_or_path: str | None = None):
    """Load the embedder offline; return (recorded name, SentenceTransformer)."""
    from sentence_transformers import SentenceTransformer

    name, source = resolve_embedder(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a tqdm bar per load
            model = SentenceTransformer(source, device="cpu", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"embedder {name_or_path!r} could not be loaded from local files ({exc.__class__.__name__}). "
            "mta-local never downloads at run time: download the model on a connected machine and pass "
            "--embedder PATH to its folder."
        ) from None
    return name, model


def embed_texts(model, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Return L2-normalized embeddings, shape (len(texts), dim), float32."""
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def user_embedding(model, texts: list[str]) -> np.ndarray:
    """Return a user's embedding: the mean of the item embeddings, L2-normalized.

    Averaging item embeddings (instead of encoding the concatenated history, as the MTA paper
    does with BGE) keeps long histories from being cut at the encoder's token limit.
    """
    mean = embed_texts(model, texts).mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
