"""Build and load meta-LoRA banks.

A bank is a folder with ``manifest.json`` and one safetensors file per anchor (a PEFT LoRA state
dict in fp16). Building clusters users by their mean item embedding with K-Means, picks in each
cluster the user with the most history items as its anchor, and trains one LoRA per anchor.
Only JSON and safetensors are ever read from a bank, never pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import __version__
from .config import LoraConfig, builtin_banks_dir, cache_dir
from .errors import BankError, HistoryError
from .history import parse_history, training_examples
from .merge import PEFT_PREFIX, LoraWeights
from .models import BaseModel, file_sha256

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# reading users and choosing anchors

def read_users(path: str | Path, task: str | None = None) -> list[tuple[str, object]]:
    """Read a LaMP per-user file ([{user_id, profile: [...]}, ...]); return (user_id, History) pairs."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HistoryError(f"{path}: file not found. Pass a JSON list of users with a \"profile\" each.") from None
    except json.JSONDecodeError as exc:
        raise HistoryError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}).") from None
    if not isinstance(data, list) or not data:
        raise HistoryError(f"{path}: expected a non-empty JSON list of users, each {{user_id, profile: [...]}}.")
    users = []
    for index, user in enumerate(data):
        if not isinstance(user, dict) or "profile" not in user or "user_id" not in user:
            raise HistoryError(f"{path}: user {index} needs the fields 'user_id' and 'profile'.")
        history = parse_history(user["profile"], source=f"{path} user {user['user_id']}", task=task)
        task = history.task.name
        users.append((str(user["user_id"]), history))
    return users


def choose_anchors(user_ids: list[str], item_counts: list[int], labels: np.ndarray, min_items: int) -> list[tuple[int, str]]:
    """Return (cluster, user id) of each cluster's anchor: the user with the most history items.

    Ties go to the smallest user id. A cluster whose largest user has fewer than ``min_items``
    items has no anchor.
    """
    anchors = []
    for cluster in sorted(set(int(label) for label in labels)):
        members = [i for i in range(len(user_ids)) if labels[i] == cluster]
        best = min(members, key=lambda i: (-item_counts[i], user_ids[i]))
        if item_counts[best] < min_items:
            logger.warning("cluster %d: largest user %s has %d items (< %d); no anchor", cluster,
                           user_ids[best], item_counts[best], min_items)
            continue
        anchors.append((cluster, user_ids[best]))
    return anchors


def cluster_users(embeddings: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """K-Means on user embeddings; returns a cluster label per user."""
    from sklearn.cluster import KMeans

    if clusters > len(embeddings):
        raise BankError(f"{clusters} clusters requested but only {len(embeddings)} users; lower --clusters.")
    return KMeans(n_clusters=clusters, random_state=seed, n_init=10).fit_predict(embeddings)


# ---------------------------------------------------------------------------------------------
# building

@dataclass
class BuildConfig:
    """Choices of ``mta-local bank build``."""

    bank_id: str  # name recorded in the manifest and in every profile built from the bank
    clusters: int = 8  # K-Means clusters V, at most one anchor each
    min_items: int = 11  # an anchor needs at least this many history items
    max_items: int = 0  # train each anchor on at most this many of its items (0: all)
    history_in_prompt: int = 1  # BM25-retrieved history items in each training prompt
    seed: int = 0


def build_bank(users_path, out_dir, base: BaseModel, embedder_name: str | None, build: BuildConfig,
               lora: LoraConfig, task: str | None = None, progress=None,
               shard: tuple[int, int] | None = None) -> dict:
    """Build a bank from a users file into ``out_dir``; return the manifest.

    The bank is written to a temporary sibling folder and renamed into place when complete.
    With ``shard=(i, n)`` every shard clusters all users the same way but trains only anchors
    number i, i + n, i + 2n, ...; the result is a shard manifest that ``assemble_shards`` joins
    with the other shards into one bank.
    """
    from .embed import load_embedder, user_embedding
    from .models import load_training_model
    from .train import encode_examples, train_lora
    from .templates import prompt_renderer

    started = time.perf_counter()
    out_dir = Path(out_dir)
    users = read_users(users_path, task)
    task_name = users[0][1].task.name

    # embed and cluster
    embedder_name, embedder = load_embedder(embedder_name)
    embeddings = np.stack([user_embedding(embedder, [history.task.history_line(item) for item in history.items])
                           for _, history in users])
    labels = cluster_users(embeddings, build.clusters, build.seed)
    user_ids = [user_id for user_id, _ in users]
    anchors = choose_anchors(user_ids, [len(h.items) for _, h in users], labels, build.min_items)
    if not anchors:
        raise BankError(f"no cluster has a user with {build.min_items} or more history items; lower --min-items.")
    logger.info("%d users, %d clusters, %d anchors", len(users), build.clusters, len(anchors))

    # train one LoRA per anchor of this shard; a shard with none skips loading the model
    numbers = [n for n in range(len(anchors)) if shard is None or n % shard[1] == shard[0]]
    logger.info("training %d of %d anchors%s", len(numbers), len(anchors), f" (shard {shard[0]}/{shard[1]})" if shard else "")
    if numbers:
        model, tokenizer = load_training_model(base)
        render = prompt_renderer(base)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    records = []
    for number in numbers:
        cluster, user_id = anchors[number]
        index = user_ids.index(user_id)
        history = users[index][1]
        if build.max_items:
            history.items = history.items[: build.max_items]
        examples = training_examples(history, k=build.history_in_prompt)
        encoded = encode_examples(tokenizer, render, examples, base.eos_token, lora.max_tokens)
        result = train_lora(model, encoded, lora, tokenizer.pad_token_id or 0, progress=progress)
        file_name = f"anchor-{number:03d}.safetensors"
        save_anchor(partial / file_name, result.adapter)
        records.append({
            "id": f"{build.bank_id}/{user_id}",
            "user_id": user_id,
            "cluster": cluster,
            "n_items": len(users[index][1].items),
            "n_trained": len(examples),
            "embedding": [round(float(x), 7) for x in embeddings[index]],
            "file": file_name,
            "sha256": file_sha256(partial / file_name),
            "train_seconds": round(result.seconds, 2),
            "train_tokens": result.tokens,
            "final_loss": round(result.losses[-1], 4),
        })
        logger.info("anchor %s: %d examples, %.1f s, final loss %.3f", user_id, len(examples), result.seconds, result.losses[-1])

    manifest = {
        "format_version": FORMAT_VERSION,
        "bank_id": build.bank_id,
        "task": task_name,
        "base_model": {"name": base.name, "file": base.path.name, "sha256": base.sha256,
                       "architecture": base.architecture},
        "embedder": {"name": embedder_name, "dim": int(embeddings.shape[1])},
        "lora": lora.to_dict(),
        "build": asdict(build),
        "clustering": {"users": len(users), "users_file": Path(users_path).name,
                       "users_sha256": file_sha256(Path(users_path).resolve()),
                       "method": "k-means over mean item embeddings",
                       "labels": {user_id: int(label) for user_id, label in zip(user_ids, labels)}},
        "anchors": records,
        "created_by": f"mta-local {__version__}",
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    if shard is not None:
        # every shard lists all anchors so that assembling can prove each was trained exactly once
        manifest["shard"] = {"index": shard[0], "count": shard[1], "anchors": [user_id for _, user_id in anchors]}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    _replace_dir(partial, out_dir)
    return manifest


def save_anchor(path: Path, adapter: LoraWeights) -> None:
    from safetensors.torch import save_file

    save_file(adapter.to_peft_state_dict(), str(path), metadata={"format": "pt"})


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# loading

class Bank:
    """An installed or built-in bank, validated on open.

    ``label`` names the bank in error messages (a URL or archive while a pull checks it);
    it defaults to the folder.
    """

    def __init__(self, path: Path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        manifest_path = self.path / MANIFEST
        if manifest_path.is_symlink():
            raise BankError(f"{self.label}: {MANIFEST} is a symbolic link; a bank must hold its own files. "
                            "Copy the real file into the bank folder or pull the bank again.")
        if not manifest_path.is_file():
            raise BankError(f"{self.label}: no {MANIFEST}; this folder is not a bank. Build one with `mta-local bank build`.")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankError(f"{self.label}: {MANIFEST} is not valid JSON ({exc}); reinstall the bank.") from None
        if not isinstance(self.manifest, dict):
            raise BankError(f"{self.label}: {MANIFEST} must hold a JSON object; reinstall the bank.")
        self._validate()

    @property
    def bank_id(self) -> str:
        return self.manifest["bank_id"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def anchors(self) -> list[dict]:
        return self.manifest["anchors"]

    def _validate(self) -> None:
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BankError(f"{self.label}: bank format version {version!r} is not understood (expected "
                            f"{FORMAT_VERSION}); upgrade mta-local or rebuild the bank.")
        if "shard" in self.manifest:
            shard = self.manifest["shard"]
            raise BankError(f"{self.label}: this is shard {shard.get('index')}/{shard.get('count')} of a bank, not a "
                            "whole bank; join all shards with `mta-local bank assemble SHARD_DIR... --out DIR`.")
        missing = [key for key in ("bank_id", "task", "base_model", "embedder", "lora", "anchors") if key not in self.manifest]
        if missing:
            raise BankError(f"{self.label}: {MANIFEST} lacks {', '.join(missing)}; rebuild the bank.")
        for anchor in self.manifest["anchors"]:
            for key in ("id", "file", "sha256", "embedding"):
                if key not in anchor:
                    raise BankError(f"{self.label}: anchor {anchor.get('id', '?')!r} lacks {key!r}; rebuild the bank.")
            check_file_name(self.path, anchor["file"], self.label)
        if not self.manifest["anchors"]:
            raise BankError(f"{self.label}: the bank lists no anchors; rebuild it.")

    def check_compatible(self, base: BaseModel, embedder_name: str) -> None:
        """Raise BankError unless the bank was built for this base model and embedder."""
        self.check_base_model(base)
        if self.manifest["embedder"]["name"] != embedder_name:
            raise BankError(
                f"bank {self.bank_id} was built with embedder {self.manifest['embedder']['name']!r}, not "
                f"{embedder_name!r}; pass --embedder {self.manifest['embedder']['name']} or use another bank."
            )

    def check_base_model(self, base: BaseModel) -> None:
        """Raise BankError unless the bank's recorded base model and its anchors' tensors fit ``base``."""
        recorded = self.manifest["base_model"]
        if recorded["sha256"] != base.sha256:
            raise BankError(
                f"bank {self.bank_id} was built for base model {recorded['name']} ({recorded['file']}, sha256 "
                f"{recorded['sha256'][:12]}...) but the base model is {base.path.name} (sha256 {base.sha256[:12]}...). "
                "Pass the matching --model or a bank built for this model."
            )
        self.check_tensors(base)

    def check_tensors(self, base: BaseModel) -> None:
        """Check each anchor file's safetensors header: lora_A/lora_B names and shapes must fit ``base``.

        Only the header is read (safetensors.safe_open), so this costs milliseconds per anchor.
        """
        from safetensors import SafetensorError, safe_open

        base_shapes = base_linear_shapes(str(base.path))
        rank = self.manifest["lora"]["rank"]
        for anchor in self.anchors:
            path = self.path / anchor["file"]
            try:
                with safe_open(str(path), "pt") as handle:
                    shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            except (SafetensorError, OSError) as exc:
                raise BankError(f"{self.label}: {anchor['file']} is not a readable safetensors file ({exc}); "
                                "pull or rebuild the bank.") from None
            for key, shape in shapes.items():
                expected = _expected_lora_shape(key, base_shapes, rank)
                if expected is None:
                    raise BankError(f"{self.label}: {anchor['file']} contains tensor {key!r}, which is not a lora_A/lora_B "
                                    f"of a {base.path.name} linear layer; use a bank built for this base model.")
                if shape != expected:
                    raise BankError(f"{self.label}: {anchor['file']} tensor {key} has shape {list(shape)} but "
                                    f"{base.path.name} needs {list(expected)} (rank {rank}); use a bank built for this base model.")

    def anchor_embeddings(self) -> tuple[list[str], np.ndarray]:
        ids = [anchor["id"] for anchor in self.anchors]
        return ids, np.array([anchor["embedding"] for anchor in self.anchors], dtype=np.float32)

    def load_anchor(self, anchor_id: str) -> LoraWeights:
        """Load one anchor's LoRA after checking its sha256 against the manifest."""
        from safetensors.torch import load_file

        anchor = next((a for a in self.anchors if a["id"] == anchor_id), None)
        if anchor is None:
            raise BankError(f"bank {self.bank_id} has no anchor {anchor_id!r}; run `mta-local bank info {self.bank_id}`.")
        path = self.path / anchor["file"]
        if not path.is_file() or file_sha256(path) != anchor["sha256"]:
            raise BankError(f"{path}: missing or its sha256 does not match the manifest; reinstall the bank.")
        lora = self.manifest["lora"]
        return LoraWeights.from_peft_state_dict(load_file(str(path)), lora["alpha"] / lora["rank"])


def check_file_name(root: Path, name, label: str) -> None:
    """Raise BankError unless ``name`` is a plain .safetensors file name inside ``root`` (no link)."""
    fix = "the bank is unsafe to use: rebuild it or get a corrected copy from its publisher."
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise BankError(f"{label}: anchor file {name!r} must be a .safetensors file inside the bank folder; {fix}")
    if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise BankError(f"{label}: anchor file {name!r} must be a .safetensors file inside the bank folder; {fix}")
    if (root / name).is_symlink():
        raise BankError(f"{label}: anchor file {name!r} is a symbolic link; a bank must hold its own files, so {fix}")
    if (root / name).resolve().parent != root.resolve():
        raise BankError(f"{label}: anchor file {name!r} must be a .safetensors file inside the bank folder; {fix}")


@lru_cache(maxsize=4)
def base_linear_shapes(gguf_path: str) -> dict[str, tuple[int, int]]:
    """Return {GGUF tensor name: (out_features, in_features)} of a base GGUF's 2-D tensors."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    # GGUF lists dimensions innermost first, the reverse of torch's (out, in)
    return {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors if len(t.shape) == 2}


def _expected_lora_shape(key: str, base_shapes: dict, rank: int) -> tuple[int, int] | None:
    from .errors import UnsupportedModelError
    from .gguf_adapter import gguf_tensor_name

    module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
    if not key.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
        return None
    try:
        name = gguf_tensor_name(module)
    except UnsupportedModelError:
        return None
    if name not in base_shapes:
        return None
    out_features, in_features = base_shapes[name]
    # lora_A maps the input to the rank (r, in); lora_B maps the rank to the output (out, r)
    return (rank, in_features) if part == "A.weight" else (out_features, rank)


def builtin_banks() -> dict[str, Path]:
    root = builtin_banks_dir()
    if not root.is_dir():
        return {}
    return {path.name: path for path in sorted(root.iterdir()) if (path / MANIFEST).is_file()}


def has_builtin_bank(task: str) -> bool:
    return any(Bank(path).task == task for path in builtin_banks().values())


def open_bank(name_or_path: str | None, task: str) -> Bank:
    """Open a bank by folder path or built-in/installed name; without one, the built-in bank for ``task``."""
    if name_or_path is None:
        for path in builtin_banks().values():
            bank = Bank(path)
            if bank.task == task:
                return bank
        raise BankError(f"no built-in bank for task {task!r} (built-in: {', '.join(builtin_banks()) or 'none'}). "
                        "Build one with `mta-local bank build` and pass --bank PATH.")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return Bank(path)
    # an installed bank takes precedence over a built-in one of the same name: pulling is explicit
    for candidate in (installed_banks_dir() / name_or_path, builtin_banks().get(name_or_path)):
        if candidate is not None and candidate.is_dir() and not name_or_path.startswith("."):
            return Bank(candidate)
    raise BankError(f"bank {name_or_path!r} not found as a folder, built-in bank or installed bank "
                    f"(built-in: {', '.join(builtin_banks()) or 'none'}). Install it with `mta-local bank pull SOURCE` "
                    "or pass --bank PATH.")


def installed_banks_dir() -> Path:
    """Return the folder that contains pulled banks, one subfolder per bank name."""
    return cache_dir() / "banks"


def installed_banks() -> dict[str, Path]:
    root = installed_banks_dir()
    if not root.is_dir():
        return {}
    return {path.name: path for path in sorted(root.iterdir())
            if not path.name.startswith(".") and path.is_dir() and (path / MANIFEST).exists()}
