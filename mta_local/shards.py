"""Build a bank in shards, on several GPUs of one machine or on several machines, and join them.

Every shard clusters all users and lists all anchors in ``shard.anchors``, but trains only the
anchors whose position i satisfies i mod N == I. Assembling checks that the shards come from
the same clustering and configuration, and that together they trained each anchor exactly once.
``build_with_workers`` runs the N shards of one machine as child processes, each pinned to one
GPU, and assembles them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .bank import MANIFEST, Bank, _replace_dir, check_file_name
from .errors import BankError
from .models import hash_file

logger = logging.getLogger(__name__)

# manifest fields that must be equal in every shard of one bank. clustering contains the users
# file's name and sha256, the K-Means labels and the user count.
SHARED_FIELDS = ("format_version", "bank_id", "task", "base_model", "embedder", "lora", "build", "clustering")


def _read_shard(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BankError(f"{folder}: no {MANIFEST}; pass folders written by `mta-local bank build --shard I/N`.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BankError(f"{path}: invalid JSON ({exc}); build the shard again.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shard"), dict):
        raise BankError(f"{folder}: not a shard (its manifest has no \"shard\" section); pass folders written by "
                        "`mta-local bank build --shard I/N`.")
    return manifest


def _check_same(shards: list[tuple[Path, dict]]) -> None:
    first_dir, first = shards[0]
    for folder, manifest in shards[1:]:
        for field in SHARED_FIELDS:
            if manifest.get(field) != first.get(field):
                raise BankError(f"shards {first_dir} and {folder} differ in {field!r}, so they are not parts of one "
                                "bank; build every shard from the same users file, options, --seed, base model "
                                "and embedder.")
        for field in ("count", "anchors"):
            if manifest["shard"].get(field) != first["shard"].get(field):
                raise BankError(f"shards {first_dir} and {folder} differ in shard {field} (K-Means gave other anchors "
                                "or --shard used another N); build every shard with the same --shard N on the same "
                                "users file and --seed.")


def _check_coverage(shards: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """Return (shard folder, anchor record) in anchor order after checking each anchor appears once."""
    count = shards[0][1]["shard"]["count"]
    order = shards[0][1]["shard"]["anchors"]
    indexes = sorted(manifest["shard"]["index"] for _, manifest in shards)
    if indexes != list(range(count)):
        missing = sorted(set(range(count)) - set(indexes))
        repeated = sorted({i for i in indexes if indexes.count(i) > 1})
        raise BankError(f"the shards have indexes {indexes} of {count} (missing {missing}, repeated {repeated}); pass "
                        f"exactly one folder per shard 0..{count - 1}, building missing ones with --shard I/{count}.")

    found: dict[str, tuple[Path, dict]] = {}
    for folder, manifest in shards:
        for record in manifest["anchors"]:
            user_id = record.get("user_id")
            if user_id in found:
                raise BankError(f"anchor {user_id} is in both {found[user_id][0]} and {folder}; rebuild one of "
                                "those shards with its own --shard I/N.")
            if user_id not in order:
                raise BankError(f"{folder}: anchor {user_id} is not in the shard's anchor list; build the shard again.")
            position = order.index(user_id)
            if position % count != manifest["shard"]["index"]:
                raise BankError(f"{folder}: anchor {user_id} (position {position}) belongs to shard {position % count}, "
                                f"not {manifest['shard']['index']}; build the shard again.")
            found[user_id] = (folder, record)
    missing = [user_id for user_id in order if user_id not in found]
    if missing:
        raise BankError(f"anchors {', '.join(missing)} are in no shard; build shard "
                        f"{order.index(missing[0]) % count}/{count} again.")
    return [found[user_id] for user_id in order]


def assemble_shards(shard_dirs: list[Path], out_dir: Path) -> dict:
    """Join shard folders into one bank at ``out_dir`` (replaced when complete); return its manifest."""
    shards = [(Path(folder), _read_shard(Path(folder))) for folder in shard_dirs]
    _check_same(shards)
    records = _check_coverage(shards)

    # copy each anchor file after checking it against its shard's manifest
    out_dir = Path(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for folder, record in records:
        check_file_name(folder, record["file"], str(folder))
        source = folder / record["file"]
        if not source.is_file() or hash_file(source) != record["sha256"]:
            shutil.rmtree(partial, ignore_errors=True)
            raise BankError(f"{source}: missing or its sha256 does not match the shard manifest; build that shard again.")
        shutil.copyfile(source, partial / record["file"])

    manifest = {key: value for key, value in shards[0][1].items() if key != "shard"}
    manifest["anchors"] = [record for _, record in records]
    # total training compute over all shards, not wall time
    manifest["build_seconds"] = round(sum(m.get("build_seconds", 0.0) for _, m in shards), 1)
    manifest["assembled_from_shards"] = len(shards)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    Bank(partial, label=str(out_dir))
    _replace_dir(partial, out_dir)
    logger.info("assembled %d shards into %s (%d anchors)", len(shards), out_dir, len(records))
    return manifest


# ---------------------------------------------------------------------------------------------
# shards as child processes on one machine

def visible_gpus() -> list[str]:
    """Return the CUDA device ids this process may use (respecting CUDA_VISIBLE_DEVICES)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def worker_env(index: int, workers: int, gpus: list[str]) -> dict[str, str]:
    """Environment of shard ``index``: one GPU each (round robin), or an equal share of the CPU cores."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def build_with_workers(build_args: list[str], out_dir: Path, workers: int, gpus: list[str], progress=None) -> dict:
    """Run ``bank build BUILD_ARGS --shard I/N`` as N child processes and assemble their shards into ``out_dir``.

    ``build_args`` are the command's arguments without --out and --shard. Each child writes a log
    next to its shard; a failed child stops the others, and its log tail is in the error.
    ``progress(done, total)`` is called as shards finish. Returns the assembled manifest.
    """
    out_dir = Path(out_dir)
    work = out_dir.with_name(f".{out_dir.name}.shards")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    children: list[tuple[int, subprocess.Popen, Path]] = []
    try:
        for index in range(workers):
            log = work / f"shard-{index}.log"
            command = [sys.executable, "-m", "mta_local", "bank", "build", *build_args,
                       "--out", str(work / f"shard-{index}"), "--shard", f"{index}/{workers}", "--workers", "1", "--silent"]
            with open(log, "wb") as sink:
                children.append((index, subprocess.Popen(command, env=worker_env(index, workers, gpus),
                                                         stdout=sink, stderr=subprocess.STDOUT), log))
            logger.info("shard %d/%d started on %s", index, workers, f"GPU {gpus[index % len(gpus)]}" if gpus else "CPU")
        running = list(children)
        while running:
            for entry in list(running):
                index, child, log = entry
                code = child.poll()
                if code is None:
                    continue
                running.remove(entry)
                if code != 0:
                    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                    raise BankError(f"shard {index}/{workers} of the bank build failed (exit {code}): "
                                    f"{' | '.join(tail) or 'no output'}. Fix that and run the build again.")
                if progress is not None:
                    progress(workers - len(running), workers)
            time.sleep(0.2)
        return assemble_shards([work / f"shard-{index}" for index in range(workers)], out_dir)
    finally:
        for _, child, _ in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(work, ignore_errors=True)
