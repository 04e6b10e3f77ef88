"""Compare tensor types for the folded per-user copy of the base: fidelity against decode speed.

    python benchmarks/fold_types.py

The script enrolls the example LaMP-2 history into a temporary data dir. It then writes the base
GGUF with the profile's adapters folded into the block projections, once per candidate type.
The reference is the same fold kept in F32: the dequantized base weights plus the exact
adapter deltas. For each copy it prints the file size, how far llama.cpp's next-token logits
on the profile's first training prompts are from the reference's, and its greedy decode speed
against the base. The adapter's own effect on those logits (reference minus an unadapted F32
copy) is the yardstick for the error.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "lamp2-user-8000029.json"
sys.path.insert(0, str(REPO))

CANDIDATES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1")  # the base's blocks are Q4_1
PROMPTS = 6
ROUNDS = 5


def next_token_logits(model_path: Path, prompts: list[str]) -> np.ndarray:
    from mta_local.chat import last_logits, load_llama
    from mta_local.models import resolve_base_model

    llm = load_llama(resolve_base_model(str(model_path)), n_ctx=1024)
    return np.stack([last_logits(llm, prompt) for prompt in prompts])


def decode_speeds(paths: list[Path]) -> list[list[float]]:
    """Return each model's decode tokens/s per round. Every round runs every model once."""
    from enroll_speed import llama_speed

    from mta_local.chat import load_llama
    from mta_local.models import resolve_base_model

    loaded = [load_llama(resolve_base_model(str(path))) for path in paths]
    speeds = [[] for _ in paths]
    for _ in range(ROUNDS):
        for index, llm in enumerate(loaded):
            speeds[index].append(llama_speed(llm)[1])
    return speeds


def rms(array: np.ndarray) -> float:
    return float(np.sqrt(np.mean(array ** 2)))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mta-fold-types-") as scratch:
        lines = report(Path(scratch))
    print("\n".join(lines))
    return 0


def report(scratch: Path) -> list[str]:
    os.environ["MTA_LOCAL_HOME"] = str(scratch / "home")  # the enrolled profile stays in the scratch dir
    from mta_local.config import EnrollConfig
    from mta_local.derived import write_folded
    from mta_local.enroll import enroll
    from mta_local.gguf_adapter import gguf_deltas
    from mta_local.models import resolve_base_model
    from mta_local.profile import load_profile
    from mta_local.verify import combined_adapter, fixed_prompts

    enroll(EXAMPLE, EnrollConfig(profile="default"))
    base = resolve_base_model()
    profile = load_profile("default")
    deltas = {name: delta.numpy() for name, delta in gguf_deltas(combined_adapter(profile), base).items()}
    prompts = fixed_prompts(profile, base, PROMPTS)

    zeros = {name: np.zeros_like(delta) for name, delta in deltas.items()}
    unadapted = next_token_logits(write_folded(base, scratch / "f32-base.gguf", zeros, "F32"), prompts)
    reference = next_token_logits(write_folded(base, scratch / "f32-fold.gguf", deltas, "F32"), prompts)
    effect = reference - unadapted

    rows, paths = [], [base.path]
    for qtype in CANDIDATES:
        started = time.perf_counter()
        path = write_folded(base, scratch / f"fold-{qtype}.gguf", deltas, qtype)
        seconds = time.perf_counter() - started
        error = next_token_logits(path, prompts) - reference
        agree = int(((error + reference).argmax(axis=1) == reference.argmax(axis=1)).sum())
        rows.append((qtype, path.stat().st_size / 1e6, seconds, rms(error), float(np.abs(error).max()), agree))
        paths.append(path)
    speeds = decode_speeds(paths)

    base_speed = float(np.median(speeds[0]))
    lines = [f"# folded copy types ({time.strftime('%Y-%m-%d')})", "",
             f"base: {base.path.name}, {base.path.stat().st_size / 1e6:.0f} MB, decode {base_speed:.1f} tokens/s "
             f"(median of {ROUNDS} rounds: 256-token prompt, 128 greedy tokens, llama.cpp's default threads)",
             f"the adapters' effect on next-token logits over {PROMPTS} training prompts: rms {rms(effect):.2f}, "
             f"max {np.abs(effect).max():.2f}", "",
             "| folded copy | MB | written in s | logit error rms | error max | error / effect (rms) "
             "| same top token as the reference | decode tokens/s | vs base (median of rounds) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (qtype, size, seconds, error_rms, error_max, agree), speed in zip(rows, speeds[1:]):
        ratios = [mine / theirs for mine, theirs in zip(speed, speeds[0])]
        lines.append(f"| {qtype} | {size:.0f} | {seconds:.1f} | {error_rms:.2f} | {error_max:.2f} | "
                     f"{100 * error_rms / rms(effect):.0f} % | {agree} of {PROMPTS} | {np.median(speed):.1f} | "
                     f"{100 * np.median(ratios):.0f} % |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
