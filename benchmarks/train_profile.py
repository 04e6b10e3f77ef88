"""Show where a stack-training micro-batch spends its time, and what the first one pays extra.

    python benchmarks/train_profile.py

The script updates no weights. It runs forward and backward passes of the default model with a
fresh rank-4 LoRA on one packed micro-batch: the longest training examples of the example LaMP-2
history that fit in one. It prints the time and page faults of the first passes, then a
torch.profiler breakdown of one more pass.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "lamp2-user-8000029.json"
sys.path.insert(0, str(REPO))

WARMUP = 4
PROFILED = 2


def micro_batch(tokenizer, base):
    from mta_local.config import PACKED_ROWS, stack_config
    from mta_local.enroll import prompt_renderer
    from mta_local.history import read_history, training_examples
    from mta_local.fused import pack
    from mta_local.train import encode_examples, pack_rows

    history = read_history(EXAMPLE)
    stack = stack_config(history.task.name)
    encoded = encode_examples(tokenizer, prompt_renderer(base), training_examples(history),
                              base.eos_token, stack.max_tokens)
    # the first micro-batch that training would pack from the examples sorted longest first
    longest = pack_rows(sorted(encoded, key=lambda example: -len(example.input_ids)), PACKED_ROWS)[0]
    return pack(longest, "cpu"), sum(len(example.input_ids) for example in longest)


def category(event) -> str:
    """Sort a profiler row into base products, LoRA products, attention or elementwise work."""
    if "scaled_dot_product" in event.key:
        return "attention"
    if event.key in ("aten::mm", "aten::addmm", "aten::addmm_"):
        dims = [dim for shape in event.input_shapes if shape for dim in shape]
        return "LoRA matrix products" if dims and min(dims) <= 16 else "base matrix products"
    return "elementwise and other work"


def product_flops(event) -> int:
    """Return the FLOPs of all calls of a profiled (m x k) @ (k x n) product row."""
    (m, k), (_, n) = event.input_shapes[:2]
    return 2 * m * k * n * event.count


def main() -> int:
    import warnings

    import torch
    from enroll_speed import matmul_gflops, matmul_parameters
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations that peft triggers

    from mta_local.config import stack_config
    from mta_local.fused import FusedLlama
    from mta_local.models import load_training_model, resolve_base_model
    from mta_local.train import loss_sum_fused

    base = resolve_base_model()
    model, tokenizer = load_training_model(base)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    stack = stack_config("movie_tagging")
    peft_model = get_peft_model(model, LoraConfig(r=stack.rank, lora_alpha=stack.alpha, lora_dropout=0.0,
                                                  target_modules=list(stack.target_modules)))
    fused = FusedLlama(peft_model)
    batch, tokens = micro_batch(tokenizer, base)
    print(f"micro-batch: {tokens} tokens in {len(batch.input_ids)} rows; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", "", "| pass | seconds | page faults |", "|---|---|---|", sep="\n")

    for index in range(WARMUP):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        loss, _ = loss_sum_fused(fused, batch)
        loss.backward()
        seconds = time.perf_counter() - started
        print(f"| {index + 1} | {seconds:.3f} | {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults:,} |")
    gflops = matmul_gflops(torch.get_num_threads())
    roofline = gflops * 1e9 / (4 * matmul_parameters())
    print("", f"last pass: {tokens / seconds:.0f} tokens/s = {100 * tokens / seconds / roofline:.0f} % of the roofline "
          f"({roofline:.0f} tokens/s from {gflops:.0f} GFLOP/s, as in enroll_speed.py)", sep="\n")

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(PROFILED):
            loss, _ = loss_sum_fused(fused, batch)
            loss.backward()
    totals: dict[str, float] = {}
    base_flops = 0
    for event in profiler.key_averages(group_by_input_shape=True):
        totals[category(event)] = totals.get(category(event), 0.0) + event.self_cpu_time_total / 1e6 / PROFILED
        if category(event) == "base matrix products" and event.key == "aten::mm":
            base_flops += product_flops(event) // PROFILED
    print("", f"## one steady-state pass under torch.profiler ({sum(totals.values()):.2f} s with the profiler's own cost)",
          "", "| work | seconds |", "|---|---|", sep="\n")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds:.2f} |")
    rate = base_flops / totals["base matrix products"] / 1e9
    print(f"\nbase matrix products: {rate:.0f} GFLOP/s, {100 * rate / gflops:.0f} % of the benchmark product's rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
