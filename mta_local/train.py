"""Train one LoRA adapter on (prompt, target) examples: anchors in the bank and the stacked adapter.

The loop has nanoGPT's shape: seed, build, loop (set lr, forward, backward, clip, step, log), return.
These changes make it faster than a plain peft loop without changing what it computes:

- Only target tokens carry loss, so the lm_head is applied at target positions only. That skips
  most of the vocabulary projection, which dominates a 135M model's compute on short targets.
- An optimizer step's gradient is the sum over its examples, whatever micro-batches they are
  split into. Each step sorts its examples by length, so a micro-batch contains similar lengths,
  and the fused path packs micro-batches of up to ``PACKED_ROWS`` tokens.
- Llama-architecture models with a LoRA on all seven block projections (the default) train
  through ``fused.FusedLlama``: packed micro-batches without padding, the examples' shared
  prompt prefix computed once, fused q/k/v and gate/up products and hand-written backward passes.
- Other models keep peft's modules with ``fast_lora_forward`` as their forward. It scales the
  (tokens x rank) intermediate instead of the (tokens x out) LoRA output and adds in place.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import PACKED_ROWS, LoraConfig
from .fused import FusedLlama, Packed, pack
from .merge import LoraWeights

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Encoded:
    """One tokenized example: prompt + target ids, and where the target starts."""

    input_ids: list[int]
    target_start: int


@dataclass
class TrainResult:
    adapter: LoraWeights
    losses: list[float]  # mean target-token loss per optimizer step
    tokens: int  # tokens processed (prompt + target, no padding), summed over epochs
    seconds: float


def encode_examples(tokenizer, render, examples: list[tuple[str, str]], eos_token: str, max_tokens: int) -> list[Encoded]:
    """Tokenize examples as the chat runtime receives them: render(prompt) + target + eos.

    A prompt longer than the budget loses tokens from its middle, so the chat header and the end
    of the instruction (where the answer is asked for) stay intact.
    """
    encoded = []
    for prompt, target in examples:
        prompt_ids = tokenizer(render(prompt), add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target + eos_token, add_special_tokens=False)["input_ids"]
        prompt_ids = cut_middle(prompt_ids, max_tokens - len(target_ids))
        encoded.append(Encoded(prompt_ids + target_ids, len(prompt_ids)))
    return encoded


def cut_middle(prompt_ids: list[int], budget: int) -> list[int]:
    """Return the prompt within ``budget`` tokens: its first tokens (up to 48) and its end, middle removed."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    head = min(48, budget // 4)
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head):]


def collate(batch: list[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; labels are IGNORE everywhere except target tokens."""
    length = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        ids = torch.tensor(example.input_ids)
        input_ids[row, : len(ids)] = ids
        labels[row, example.target_start : len(ids)] = ids[example.target_start :]
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def loss_sum_plain(model, batch) -> tuple[torch.Tensor, int]:
    """Summed target-token loss with full logits at every position (reference implementation)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def loss_sum_fast(model, batch) -> tuple[torch.Tensor, int]:
    """Summed target-token loss, projecting to the vocabulary only where a target token follows."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    positions = labels != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][positions])
    return F.cross_entropy(logits.float(), labels[positions], reduction="sum"), int(positions.sum())


def loss_sum_fused(fused: FusedLlama, batch: Packed) -> tuple[torch.Tensor, int]:
    """Return what ``loss_sum_fast`` returns for the same examples, computed by the fused Llama forward."""
    logits = fused.causal_lm.lm_head(fused.target_hidden(batch))
    return F.cross_entropy(logits.float(), batch.target_ids, reduction="sum"), len(batch.target_ids)


def fast_lora_forward(self, x, *args, **kwargs):
    """Forward of a peft LoRA Linear with one active adapter and no dropout: base(x) + B(s * A(x))."""
    name = self.active_adapters[0]
    result = self.base_layer(x, *args, **kwargs)
    # the frozen base layer's backward needs x and its weight, not its output, so adding in place is safe
    return result.add_(self.lora_B[name](self.lora_A[name](x) * self.scaling[name]))


def use_fast_lora_forward(peft_model) -> int:
    """Give every LoRA Linear of ``peft_model`` the fast forward; return how many were switched.

    Layers with dropout, DoRA, several active adapters or an adapter dtype other than the base
    layer's keep peft's forward.
    """
    from peft.tuners.lora import Linear as LoraLinear

    switched = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLinear) or len(module.active_adapters) != 1:
            continue
        name = module.active_adapters[0]
        if module.use_dora.get(name) or not isinstance(module.lora_dropout[name], torch.nn.Identity):
            continue
        if module.lora_A[name].weight.dtype != module.base_layer.weight.dtype:
            continue  # peft casts the input for an adapter in another dtype; this forward does not
        module.forward = types.MethodType(fast_lora_forward, module)  # an instance attribute; unload drops the module
        switched += 1
    return switched


def fixed_size(examples: list[Encoded], size: int) -> list[list[Encoded]]:
    """Split examples into micro-batches of ``size`` examples."""
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def pack_rows(examples: list[Encoded], max_rows: int) -> list[list[Encoded]]:
    """Split examples into micro-batches of at most ``max_rows`` tokens. A longer example gets one of its own."""
    batches, rows = [], 0
    for example in examples:
        if not batches or rows + len(example.input_ids) > max_rows:
            batches.append([])
            rows = 0
        batches[-1].append(example)
        rows += len(example.input_ids)
    return batches


def cosine_lr(step: int, total: int, peak: float) -> float:
    return 0.5 * peak * (1.0 + math.cos(math.pi * step / max(total, 1)))


def train_lora(model, encoded: list[Encoded], config: LoraConfig, pad_id: int, progress=None) -> TrainResult:
    """Train a fresh LoRA on ``model`` (left unchanged) and return its weights.

    ``progress``, if given, is called as progress(step, total_steps, loss) after each optimizer step.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # seed
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = next(model.parameters()).device

    # build: freeze the base, wrap it with a new LoRA
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                                 lora_dropout=0.0, bias="none", use_rslora=config.use_rslora,
                                 use_dora=config.use_dora)
    with warnings.catch_warnings():
        # transformers 5 deprecates an attribute that peft still reads; harmless
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, peft_config)
    peft_model.train()
    if FusedLlama.supports(peft_model):
        loss_sum = functools.partial(loss_sum_fused, FusedLlama(peft_model))
        prepare = functools.partial(pack, device=device)
        split = functools.partial(pack_rows, max_rows=PACKED_ROWS)
    else:
        use_fast_lora_forward(peft_model)
        loss_sum = functools.partial(loss_sum_fast, peft_model)
        prepare = functools.partial(collate, pad_id=pad_id, device=device)
        split = functools.partial(fixed_size, size=config.batch_size)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)

    examples_per_step = config.batch_size * config.grad_accum
    steps_per_epoch = math.ceil(len(encoded) / examples_per_step)
    total_steps = steps_per_epoch * config.epochs
    losses, tokens, started, step = [], 0, time.perf_counter(), 0

    # loop
    for epoch in range(config.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), examples_per_step):
            chunk = sorted((encoded[i] for i in order[start : start + examples_per_step]), key=lambda e: len(e.input_ids))
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, config.learning_rate)

            n_targets = sum(len(example.input_ids) - max(example.target_start, 1) for example in chunk)
            step_loss = 0.0
            for micro_batch in split(chunk):
                summed, _ = loss_sum(prepare(micro_batch))
                (summed / n_targets).backward()
                step_loss += summed.item() / n_targets
            tokens += sum(len(example.input_ids) for example in chunk)

            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            logger.debug("epoch %d step %d/%d loss %.4f", epoch + 1, step, total_steps, step_loss)
            if progress is not None:
                progress(step, total_steps, step_loss)

    # return: read the adapter out and restore the plain model
    adapter = _read_adapter(peft_model, config)
    peft_model.unload()
    return TrainResult(adapter, losses, tokens, time.perf_counter() - started)


def _read_adapter(peft_model, config: LoraConfig) -> LoraWeights:
    from peft import get_peft_model_state_dict

    state = {key: value.detach().float().cpu().clone() for key, value in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    return LoraWeights.from_peft_state_dict(state, config.alpha / config.rank)
