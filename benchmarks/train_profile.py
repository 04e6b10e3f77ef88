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


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

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
        print(f"| {index + 1} | {time.perf_counter() - started:.3f} | "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults:,} |")

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(PROFILED):
            loss, _ = loss_sum_fused(fused, batch)
            loss.backward()
    totals: dict[str, float] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        totals[category(event)] = totals.get(category(event), 0.0) + event.self_cpu_time_total / 1e6 / PROFILED
    print("", f"## one steady-state pass under torch.profiler ({sum(totals.values()):.2f} s with the profiler's own cost)",
          "", "| work | seconds |", "|---|---|", sep="\n")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
