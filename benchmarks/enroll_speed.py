"""Measure enroll speed, memory, per-user storage and llama.cpp serving speed on this machine.

    python benchmarks/enroll_speed.py                      # one 10-item history
    python benchmarks/enroll_speed.py --users 8            # scaling: 8 users enrolled in one process

Prints one report (Markdown) to stdout. Figures depend on the machine; the report starts with
its description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "lamp2-user-8000029.json"
LAMP2_TEST = REPO.parent / "shared" / "data" / "lamp2-movie-tagging" / "test_100.json"
sys.path.insert(0, str(REPO))


def machine() -> str:
    import importlib.metadata

    import torch

    cpu, features = platform.processor(), ""
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
        names = [name for flag, name in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in flags]
        features = f" with {' and '.join(names)}" if names else ""
    return (f"{cpu}{features}; {os.cpu_count()} logical CPUs; torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads; llama-cpp-python {importlib.metadata.version('llama_cpp_python')}; "
            f"Python {platform.python_version()}; {platform.system()} {platform.machine()}")


def matmul_gflops(threads: int, size=(2048, 576, 1536), repeats: int = 20, bursts: int = 5) -> float:
    """fp32 matmul throughput with torch at ``threads`` threads, on a shape typical of the model's MLP.

    Returns the median of ``bursts`` timed bursts: on a shared machine one burst alone varied by
    about 10 % between runs, and training runs under the machine's typical conditions, not its best.
    """
    import torch

    torch.set_num_threads(threads)
    n, k, m = size
    a, b = torch.randn(n, k), torch.randn(k, m)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(bursts):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        rates.append(2 * n * k * m * repeats / (time.perf_counter() - started) / 1e9)
    return sorted(rates)[bursts // 2]


def is_block_projection(tensor) -> bool:
    projections = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")
    return tensor.name.startswith("blk.") and any(part in tensor.name for part in projections) and len(tensor.shape) == 2


def matmul_parameters() -> int:
    """Parameters of the block projections plus lm_head of the default model (read from the GGUF)."""
    import gguf

    from mta_local.models import resolve_base_model

    reader = gguf.GGUFReader(str(resolve_base_model().path))
    total = 0
    for tensor in reader.tensors:
        if is_block_projection(tensor):
            total += int(np.prod(tensor.shape))
        elif tensor.name == "token_embd.weight":  # tied with lm_head in SmolLM2
            total += int(np.prod(tensor.shape))
    return total


SPEED_ROUNDS = 5

CHILD = r"""
import json, resource, sys, time
started = time.perf_counter()
from mta_local.config import EnrollConfig
from mta_local.enroll import enroll
histories = json.loads(sys.argv[1])
results = []
for index, path in enumerate(histories):
    t0 = time.perf_counter()
    result = enroll(path, EnrollConfig(profile=f"user{index}"))
    results.append({"timings": result.timings, "seconds": time.perf_counter() - t0,
                    "size": result.size_bytes, "train_tokens": result.train_tokens,
                    "train_seconds": result.train_seconds})
print(json.dumps({"results": results, "total": time.perf_counter() - started,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_enrolls(histories: list[Path], home: Path) -> dict:
    from mta_local.config import cache_dir

    # the child shares the parent's cache, where the converted base model already is
    env = dict(os.environ, MTA_LOCAL_HOME=str(home), MTA_LOCAL_CACHE=str(cache_dir()))
    output = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(h) for h in histories])],
                            env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def scale_histories(count: int, folder: Path) -> list[Path]:
    """Return ``count`` real 10-item histories: the example, then LaMP-2 evaluation entries."""
    from converters.lamp2_movies import split

    paths = [EXAMPLE]
    if count > 1:
        _, evaluation, _ = split(json.loads(LAMP2_TEST.read_text(encoding="utf-8")))
        for entry in evaluation:
            if len(paths) == count:
                break
            if str(entry["user_id"]) == "8000029":
                continue
            path = folder / f"user-{entry['user_id']}.json"
            path.write_text(json.dumps(entry["profile"]), encoding="utf-8")
            paths.append(path)
    return paths


def load_case(base, adapters: list[tuple[Path, float]], threads: int | None = None):
    """Load ``base`` in llama.cpp with the given adapters active; return the Llama object."""
    import ctypes

    import llama_cpp

    from mta_local.chat import load_llama

    llm = load_llama(base, n_ctx=1024, threads=threads)
    if adapters:
        handles = [llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode()) for path, _ in adapters]
        for handle in handles:
            llm._stack.callback(llama_cpp.llama_adapter_lora_free, handle)
        array = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
        scales = (ctypes.c_float * len(handles))(*[scale for _, scale in adapters])
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, array, len(handles), scales):
            raise RuntimeError("llama.cpp rejected the adapters")
    return llm


def llama_speed(llm, prompt_tokens: int = 256, decode_tokens: int = 128) -> tuple[float, float]:
    """Return (prompt tokens/s, decode tokens/s) of one greedy run of ``llm``."""
    import llama_cpp

    text = EXAMPLE.read_text(encoding="utf-8")
    tokens = llm.tokenize(text.encode(), add_bos=False)[:prompt_tokens]
    llm.reset()
    started = time.perf_counter()
    llm.eval(tokens)
    prompt_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(decode_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        llm.eval([int(np.argmax(logits))])
    decode_seconds = time.perf_counter() - started
    return len(tokens) / prompt_seconds, decode_tokens / decode_seconds


def serving_report(profile_dir: Path, lines: list[str]) -> None:
    from mta_local.derived import ensure_adapter, folded_base
    from mta_local.gguf_adapter import write_adapter
    from mta_local.models import resolve_base_model
    from mta_local.profile import load_profile
    from mta_local.verify import merged_adapter

    base = resolve_base_model()
    profile = load_profile("user0")
    merged_path = profile_dir / "merged.gguf"
    stacked_path = profile_dir / "stacked.gguf"
    write_adapter(merged_path, merged_adapter(profile), base)
    write_adapter(stacked_path, profile.stacked(), base)
    started = time.perf_counter()
    folded = folded_base(profile, base)
    lines += ["", f"folded per-user copy written in {time.perf_counter() - started:.1f} s "
              f"({folded.path.stat().st_size / 1e6:.0f} MB; the first `chat` after enroll pays this once)"]
    cases = [
        ("base alone", base, []),
        ("base + combined adapter (F16 GGUF, `chat --runtime-adapter`, `serve`)", base, [(ensure_adapter(profile, base), 1.0)]),
        ("base + merged + stacked as two adapters", base, [(merged_path, 1.0), (stacked_path, 1.0)]),
        (f"folded per-user copy ({folded.path.name.split('.')[-2]}, what `chat` uses)", folded, []),
    ]
    lines += ["", f"## llama.cpp serving speed (greedy, 256-token prompt, 128 decoded tokens, median of {SPEED_ROUNDS} "
              "rounds; each round runs every model once, and a row's share of the base is the median of its per-round "
              "shares, so slow spells of the machine hit all rows alike)", "",
              "| model | prompt tokens/s | decode tokens/s | decode vs base |", "|---|---|---|---|"]
    loaded = [load_case(model, adapters) for _, model, adapters in cases]
    runs = [[] for _ in cases]
    for _ in range(SPEED_ROUNDS):
        for index, llm in enumerate(loaded):
            runs[index].append(llama_speed(llm))
    base_decode = [decode for _, decode in runs[0]]
    for (label, _, _), measured in zip(cases, runs):
        prompt_speed, decode_speed = (float(np.median(column)) for column in zip(*measured))
        share = np.median([decode / base for (_, decode), base in zip(measured, base_decode)])
        lines.append(f"| {label} | {prompt_speed:.0f} | {decode_speed:.1f} | {100 * share:.0f} % |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1, help="enroll this many real 10-item histories in one process")
    parser.add_argument("--skip-serving", action="store_true", help="leave out the llama.cpp speed table")
    args = parser.parse_args()

    import torch

    from mta_local.models import converted_dir, load_training_model, resolve_base_model

    threads = torch.get_num_threads()
    lines = [f"# enroll benchmark ({time.strftime('%Y-%m-%d')})", "", f"machine: {machine()}", ""]

    gflops = matmul_gflops(threads)
    params = matmul_parameters()
    roofline = gflops * 1e9 / (4 * params)
    lines += [f"fp32 matmul: {gflops:.0f} GFLOP/s at {threads} threads",
              f"matmul parameters (blocks + lm_head): {params / 1e6:.1f} M -> roofline {roofline:.0f} trained tokens/s "
              "(4 FLOPs per parameter per token)"]

    if not converted_dir(resolve_base_model()).joinpath("config.json").is_file():
        print("converting the base model for transformers into the cache (once per base model, about 25 s)",
              file=sys.stderr)
    load_training_model(resolve_base_model())  # the converted-model cache is built once, outside the timings
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        histories = scale_histories(args.users, scratch)
        report = run_enrolls(histories, scratch / "home")
        first = report["results"][0]
        timings = first["timings"]
        loop_speed = first["train_tokens"] / first["train_seconds"]
        stage_speed = first["train_tokens"] / timings["train"]
        users = f"{len(histories)} user" + ("s" if len(histories) > 1 else "")
        lines += ["", "## enroll of one 10-item history (LaMP-2 example user, default model and bank)", "",
                  "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in timings.items()]
        lines += [f"| end to end (in process, imports included) | {first['seconds']:.1f} |", "",
                  f"stack training: {loop_speed:.0f} tokens/s = {100 * loop_speed / roofline:.0f} % of the roofline "
                  f"over the optimizer loop; {stage_speed:.0f} tokens/s = {100 * stage_speed / roofline:.0f} % over the "
                  "whole train stage (tokenizing and wrapping the model included)",
                  f"peak resident memory of the enroll process ({users}, one after another): "
                  f"{report['peak_rss_kb'] / 1024:.0f} MB",
                  f"profile on disk: {first['size'] / 1e6:.3f} MB ({first['size'] / 2**20:.3f} MiB); "
                  f"a full rank-8 per-user LoRA (OPPU style, fp16): {full_lora_bytes() / 1e6:.2f} MB",
                  f"derived files outside the profile (rebuilt when missing): runtime GGUF adapter "
                  f"{derived_bytes(scratch / 'home', 'adapter-') / 1e6:.2f} MB"]
        if args.users > 1:
            lines += ["", f"## {args.users} users in one process", "",
                      "| user | seconds | training tokens/s | of the roofline | profile MB |", "|---|---|---|---|---|"]
            for i, r in enumerate(report["results"]):
                speed = r["train_tokens"] / r["train_seconds"]
                lines.append(f"| {i + 1} | {r['seconds']:.1f} | {speed:.0f} | {100 * speed / roofline:.0f} % "
                             f"| {r['size'] / 1e6:.3f} |")
            lines += [f"total {report['total']:.0f} s; storage {sum(r['size'] for r in report['results']) / 1e6:.1f} MB; "
                      "the bank is shared and stored once"]
        if not args.skip_serving:
            os.environ["MTA_LOCAL_HOME"] = str(scratch / "home")
            serving_report(scratch, lines)
    print("\n".join(lines))
    return 0


def derived_bytes(home: Path, prefix: str) -> int:
    """Bytes of the first user's derived files whose names start with ``prefix``."""
    return sum(p.stat().st_size for p in (home / "data" / "derived" / "user0").glob(f"{prefix}*"))


def full_lora_bytes() -> int:
    """fp16 bytes of a rank-8 LoRA on every block projection of the default model."""
    import gguf

    from mta_local.models import resolve_base_model

    reader = gguf.GGUFReader(str(resolve_base_model().path))
    total = 0
    for tensor in reader.tensors:
        if is_block_projection(tensor):
            fan_in, fan_out = (int(x) for x in tensor.shape)
            total += 8 * (fan_in + fan_out) * 2
    return total


if __name__ == "__main__":
    sys.exit(main())
