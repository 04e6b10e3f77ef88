"""A fused training forward for Llama-architecture models with LoRA on all seven block projections.

It computes what transformers' LlamaForCausalLM wrapped by peft computes, in fewer operations:

- the frozen q/k/v weights of a block are one (q+k+v, hidden) matrix and gate/up one
  (2 x intermediate, hidden) matrix, so each is one matrix product forward and one backward;
- a LoRA projection (base + scaled low-rank path) is one autograd function whose backward adds the
  low-rank path into the base's input gradient in place;
- RMSNorm and SiLU(gate) * up are computed inside the projection that follows them, and their
  outputs are not stored: the norm's projection computes its backward from x and 1 / rms alone,
  and the SwiGLU projection recomputes its input;
- these two and the rotary embedding have hand-written backward passes, so autograd's chain of
  elementwise temporaries is not built;
- a micro-batch is packed (``pack``): its examples' tokens are rows of one matrix, without
  padding, and the prompt prefix the examples share (the chat header, for instance) is one set of
  rows that every example attends over. Its causal outputs are the same in every example, so
  computing them once gives the same loss and gradients;
- in the last block only the rows that predict a target token go on past attention: the other
  rows were needed as keys and values, and nothing after the last block reads them.

``FusedLlama.supports`` checks whether a model qualifies, and ``train_lora`` falls back to peft's
modules otherwise. Tests compare the loss and gradients with peft's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_forward(x, weight, lora_a, lora_b, scaling):
    """Compute x W^T + s (x A^T) B^T and return it with the (tokens x rank) intermediate x A^T."""
    mid = x @ lora_a.t()
    out = x @ weight.t()
    return out.addmm_(mid, lora_b.t(), alpha=scaling), mid


def _lora_backward(grad, x, weight, lora_a, lora_b, mid, scaling, need_x=True):
    """Return the gradients of ``_lora_forward`` for x (None unless ``need_x``), A and B; W is frozen."""
    grad_mid = (grad @ lora_b).mul_(scaling)
    grad_x = (grad @ weight).addmm_(grad_mid, lora_a) if need_x else None
    return grad_x, grad_mid.t() @ x, (mid.t() @ grad).t().mul_(scaling)


def _rms_norm(x, weight, eps):
    """Apply transformers' LlamaRMSNorm, w * x / sqrt(mean(x^2) + eps), and return it with 1 / sqrt(...)."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x * rstd), rstd


def _rms_norm_backward(grad, x, weight, rstd):
    """Return the gradient of ``_rms_norm`` for x; the norm weight is frozen."""
    scaled = grad * weight
    dot = torch.linalg.vecdot(scaled, x).unsqueeze(-1).div_(x.shape[-1])  # mean(scaled * x) without building the product tensor
    return scaled.mul_(rstd).addcmul_(x, dot.mul_(rstd.pow(3)), value=-1)


class LoraLinear(torch.autograd.Function):
    """LoRA projection y = x W^T + s (x A^T) B^T with a frozen W, trained through A and B."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):
        out, mid = _lora_forward(x, weight, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, mid)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_a, grad_b = _lora_backward(grad, *ctx.saved_tensors, ctx.scaling, ctx.needs_input_grad[0])
        return grad_x, None, grad_a, grad_b, None


class NormLoraLinear(torch.autograd.Function):
    """LoraLinear of RMSNorm(x). Backward needs x and 1 / rms, not the normalized input."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps, weight, lora_a, lora_b, scaling):
        normed, rstd = _rms_norm(x, norm_weight, eps)
        out, mid = _lora_forward(normed, weight, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, norm_weight, rstd, weight, lora_a, lora_b, mid)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, rstd, weight, lora_a, lora_b, mid = ctx.saved_tensors
        grad_mid = (grad @ lora_b).mul_(ctx.scaling)
        # grad_A = grad_mid^T normed. Because normed = norm_weight * x * rstd only scales the rows and
        # columns of x, the scaling moves onto the small factors and normed is never built.
        grad_a = ((grad_mid * rstd).t() @ x).mul_(norm_weight)
        grad_b = (mid.t() @ grad).t().mul_(ctx.scaling)
        grad_x = None
        if ctx.needs_input_grad[0]:  # False in the first block because the embeddings are frozen
            grad_normed = (grad @ weight).addmm_(grad_mid, lora_a)
            grad_x = _rms_norm_backward(grad_normed, x, norm_weight, rstd)
        return grad_x, None, None, None, grad_a, grad_b, None


class SwiGLULoraLinear(torch.autograd.Function):
    """LoraLinear of silu(gate) * up, with gate and up side by side in the input's last dimension.

    Backward recomputes the product instead of storing it.
    """

    @staticmethod
    def forward(ctx, gate_up, weight, lora_a, lora_b, scaling):
        gate, up = gate_up.chunk(2, dim=-1)
        out, mid = _lora_forward(F.silu(gate) * up, weight, lora_a, lora_b, scaling)
        ctx.save_for_backward(gate_up, weight, lora_a, lora_b, mid)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        gate_up, weight, lora_a, lora_b, mid = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        grad_act, grad_a, grad_b = _lora_backward(grad, activated * up, weight, lora_a, lora_b, mid, ctx.scaling)
        grad_input = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_input.chunk(2, dim=-1)
        torch.mul(grad_act, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_gate)
        return grad_input, None, grad_a, grad_b, None


class Rotary(torch.autograd.Function):
    """Rotary embedding of transformers' Llama over the last dimension: x cos + rotate_half(x) sin.

    rotate_half(x) sin equals roll(x, half) * signed_sin, where signed_sin is sin with its first
    half negated. Rolling by half the dimension is its own inverse, so backward rolls back.
    """

    @staticmethod
    def forward(ctx, x, cos, signed_sin):
        ctx.save_for_backward(cos, signed_sin)
        return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, -1), signed_sin)

    @staticmethod
    def backward(ctx, grad):
        cos, signed_sin = ctx.saved_tensors
        return (grad * cos).add_((grad * signed_sin).roll(grad.shape[-1] // 2, -1)), None, None


class FusedLlama:
    """Training forward of a peft-wrapped Llama model, which trains the peft LoRA parameters themselves."""

    def __init__(self, peft_model):
        from peft.tuners.lora import Linear as PeftLoraLinear

        self.causal_lm = peft_model.get_base_model()
        config = self.causal_lm.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.blocks = []
        for layer in self.causal_lm.model.layers:
            modules = {name: _projection(layer, name) for name in PROJECTIONS}
            if not all(isinstance(module, PeftLoraLinear) for module in modules.values()):
                raise ValueError("invalid model for the fused forward: a block projection has no LoRA; "
                                 "check FusedLlama.supports first.")
            self.blocks.append({
                "input_norm": layer.input_layernorm,
                "post_norm": layer.post_attention_layernorm,
                "qkv": _fused_weight([modules[name] for name in ("q_proj", "k_proj", "v_proj")]),
                "o": modules["o_proj"],
                "gate_up": _fused_weight([modules[name] for name in ("gate_proj", "up_proj")]),
                "down": modules["down_proj"],
                "lora": {name: _lora(module) for name, module in modules.items()},
            })

    @staticmethod
    def supports(peft_model) -> bool:
        """Return True for a transformers Llama model whose seven block projections carry one plain LoRA each."""
        from peft.tuners.lora import Linear as PeftLoraLinear

        model = peft_model.get_base_model()
        if next(model.parameters()).device.type not in ("cpu", "cuda"):
            return False  # NOTE: other devices (MPS) keep peft's forward because the fused one was never run there
        config = model.config
        # the rotary tables come from the model's own rotary module, so any rope scaling is covered
        plain_llama = (config.model_type == "llama" and not getattr(config, "attention_bias", False)
                       and not getattr(config, "mlp_bias", False) and config.hidden_act == "silu"
                       and getattr(config, "pretraining_tp", 1) == 1 and not getattr(config, "attention_dropout", 0.0))
        if not plain_llama:
            return False
        for layer in model.model.layers:
            for name in PROJECTIONS:
                module = _projection(layer, name)
                if not isinstance(module, PeftLoraLinear) or len(module.active_adapters) != 1:
                    return False
                adapter = module.active_adapters[0]
                if (module.use_dora.get(adapter) or not isinstance(module.lora_dropout[adapter], torch.nn.Identity)
                        or module.base_layer.bias is not None
                        or module.lora_A[adapter].weight.dtype != module.base_layer.weight.dtype):
                    return False
        return True

    def target_hidden(self, batch: Packed) -> torch.Tensor:
        """Return the final-norm hidden states at ``batch.target_rows``, shape (targets, hidden)."""
        model = self.causal_lm.model
        rows = batch.input_ids.shape[0]
        hidden = model.embed_tokens(batch.input_ids)
        cos, sin = model.rotary_emb(hidden, batch.positions.unsqueeze(0))
        half = self.head_dim // 2
        # broadcast over heads: (rows, 1, head_dim)
        cos, signed_sin = cos[0].unsqueeze(1), torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).unsqueeze(1)
        qk_heads = self.heads + self.kv_heads
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            lora = block["lora"]
            qkv = _project(hidden, block["qkv"], [lora["q_proj"], lora["k_proj"], lora["v_proj"]], block["input_norm"])
            # q and k rotate as one tensor. v is copied so that the (rows x q+k+v) product can be freed.
            qk = Rotary.apply(qkv[:, : q_size + kv_size].view(rows, qk_heads, self.head_dim), cos, signed_sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = qkv[:, q_size + kv_size :].contiguous().view(rows, self.kv_heads, self.head_dim)
            attention = self._attention(q, k, v, batch)
            if index == last:
                # only target rows reach the loss from here on, because the other rows served as keys and values
                hidden, attention = hidden[batch.target_rows], attention[batch.target_rows]
            hidden = hidden + _project(attention, block["o"].base_layer.weight, [lora["o_proj"]])
            gate_up = _project(hidden, block["gate_up"], [lora["gate_proj"], lora["up_proj"]], block["post_norm"])
            hidden = hidden + _project(gate_up, block["down"].base_layer.weight, [lora["down_proj"]], "swiglu")
        return model.norm(hidden)

    def _attention(self, q, k, v, batch: Packed) -> torch.Tensor:
        """Return causal attention of each example over its own rows, shape (rows, heads * head_dim).

        The rows are gathered into right-padded (examples, longest) tensors, so that one batched
        call serves all examples: a real position never attends to the pads after it, and the
        pads' outputs are not gathered back. The shared prefix rows appear in every example, and
        their outputs are taken from the first one.
        """
        examples, longest = batch.example_rows.shape
        rows = batch.example_rows.view(-1)
        padded = [tensor.index_select(0, rows).view(examples, longest, *tensor.shape[1:]).transpose(1, 2)
                  for tensor in (q, k, v)]
        out = F.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return out.transpose(1, 2).reshape(examples * longest, -1).index_select(0, batch.output_rows)


@dataclass
class Packed:
    """A micro-batch for ``FusedLlama``: its examples' tokens as rows, without padding.

    The examples' common prefix is stored once, as the first example's first rows.
    """

    input_ids: torch.Tensor  # (rows,)
    positions: torch.Tensor  # (rows,) position of each row in its example
    example_rows: torch.Tensor  # (examples, longest) row of each example position, right-padded with row 0
    output_rows: torch.Tensor  # (rows,) where each row's attention output is in the flattened (examples, longest)
    target_rows: torch.Tensor  # rows whose hidden state predicts a target token
    target_ids: torch.Tensor  # the token each of those rows predicts


def pack(examples, device) -> Packed:
    """Pack examples (each with ``input_ids`` and ``target_start``) into one ``Packed`` micro-batch."""
    first = examples[0].input_ids
    prefix = min(len(example.input_ids) for example in examples) - 1  # every example keeps a row of its own
    for example in examples[1:]:
        prefix = min(prefix, _common_prefix(first, example.input_ids))
    longest = max(len(example.input_ids) for example in examples)
    ids, positions, output_rows = list(first[:prefix]), list(range(prefix)), list(range(prefix))
    example_rows, target_rows, target_ids = [], [], []
    for index, example in enumerate(examples):
        start = len(ids)
        ids += example.input_ids[prefix:]
        positions += range(prefix, len(example.input_ids))
        output_rows += range(index * longest + prefix, index * longest + len(example.input_ids))
        own = list(range(prefix)) + list(range(start, len(ids)))
        example_rows.append(own + [0] * (longest - len(own)))
        # the hidden state at position p predicts token p + 1; token 0 is never predicted
        for position in range(max(example.target_start, 1) - 1, len(example.input_ids) - 1):
            target_rows.append(own[position])
            target_ids.append(example.input_ids[position + 1])
    return Packed(*(torch.tensor(values, device=device)
                    for values in (ids, positions, example_rows, output_rows, target_rows, target_ids)))


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def _projection(layer, name: str):
    return getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name, None)


def _lora(module) -> tuple[torch.nn.Parameter, torch.nn.Parameter, float]:
    name = module.active_adapters[0]
    return module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])


def _fused_weight(modules) -> torch.Tensor:
    """Concatenate the frozen weights of ``modules`` along the output dimension.

    Each module's weight then becomes a view of its rows, so the model and the fused matrix share
    one copy.
    """
    weights = [module.base_layer.weight for module in modules]
    fused = torch.cat([weight.detach() for weight in weights], dim=0)
    start = 0
    for weight in weights:
        weight.data = fused[start : start + weight.shape[0]]
        start += weight.shape[0]
    return fused


def _project(x: torch.Tensor, weight: torch.Tensor, loras, before=None) -> torch.Tensor:
    """Project x through the frozen ``weight`` plus the LoRAs of its row blocks (one LoRA per block).

    ``before`` applies first: an RMSNorm module, "swiglu", or nothing.
    """
    if len(loras) == 1:
        lora_a, lora_b, scaling = loras[0]
    else:
        # one low-rank path for all blocks: A stacked, B block-diagonal with each block's scaling in it
        lora_a = torch.cat([a for a, _, _ in loras], dim=0)
        lora_b = torch.block_diag(*[b * scaling for _, b, scaling in loras])
        scaling = 1.0
    if before is None:
        return LoraLinear.apply(x, weight, lora_a, lora_b, scaling)
    if before == "swiglu":
        return SwiGLULoraLinear.apply(x, weight, lora_a, lora_b, scaling)
    return NormLoraLinear.apply(x, before.weight, before.variance_epsilon, weight, lora_a, lora_b, scaling)
