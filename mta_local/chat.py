"""Chat with a profile through llama.cpp (llama-cpp-python), with its adapter verified as applied.

llama-cpp-python's ``Llama(lora_path=...)`` raises when llama.cpp cannot load or set the adapter,
but an adapter that loads and changes nothing (wrong tensor names, a misread alpha) would pass
silently. So enroll records a probe: the next-token logits of a fixed prompt with and without the
adapter. Chat recomputes them with the adapter and requires them to match the adapted record, not
the base one.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import AdapterNotAppliedError
from .history import Retriever, parse_history
from .models import BaseModel, resolve_base_model
from .profile import Profile
from .tasks import TASKS, with_history
from .templates import chat_formatter, render_messages

logger = logging.getLogger(__name__)

PROBE_TOKENS = 16  # how many token ids of the probe's logits are stored


@contextmanager
def _quiet_stderr():
    """Silence llama.cpp's C-level log lines (model loading prints hundreds) unless --verbose."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Return True when the CPU reports Intel AMX in the flags of Linux's /proc/cpuinfo."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_int8" in line.split() for line in cpuinfo.splitlines())


_model_params_lock = threading.Lock()


@contextmanager
def _without_extra_buffers(enabled: bool):
    """Load llama.cpp weights without its extra buffer types (AMX and repacked layouts) when ``enabled``.

    llama-cpp-python 0.3.36 built from source on an AMX CPU places the Q4_1 weights of the default
    model in ggml's AMX buffer, and the first matrix product there ends the process with a
    segmentation fault (seen on a 2-core virtual machine). ``Llama()`` has no argument for the
    model parameter ``use_extra_bufts``, so its default is replaced while the model loads.
    """
    if not enabled:
        yield
        return
    import llama_cpp.llama as llama_module

    with _model_params_lock:
        original = llama_module.llama_cpp.llama_model_default_params

        def params():
            value = original()
            value.use_extra_bufts = False
            return value

        llama_module.llama_cpp.llama_model_default_params = params
        try:
            yield
        finally:
            llama_module.llama_cpp.llama_model_default_params = original


def load_llama(base: BaseModel, adapter: Path | None = None, n_ctx: int = 2048, threads: int | None = None, seed: int = 0):
    """Load the base GGUF in llama.cpp with at most one adapter and the model's own chat template."""
    from llama_cpp import Llama

    if adapter is not None and not Path(adapter).is_file():
        raise AdapterNotAppliedError(f"adapter {adapter} not found; enroll again to recreate the profile.")
    kwargs = dict(model_path=str(base.path), n_ctx=n_ctx, seed=seed, verbose=False,
                  chat_handler=chat_formatter(base).to_chat_handler())
    if threads:
        kwargs.update(n_threads=threads, n_threads_batch=threads)
    if adapter is not None:
        kwargs["lora_path"] = str(adapter)
    try:
        with _quiet_stderr(), _without_extra_buffers(cpu_has_amx()):
            llm = Llama(**kwargs)
    except (RuntimeError, ValueError) as exc:
        raise AdapterNotAppliedError(f"llama.cpp rejected {adapter or base.path}: {exc}. Enroll again.") from None
    if adapter is not None and getattr(llm, "_lora_adapter", None) is None:
        raise AdapterNotAppliedError(f"llama-cpp-python loaded no adapter from {adapter}; check the llama-cpp-python version (0.3.36 is tested).")
    return llm


def last_logits(llm, text: str) -> np.ndarray:
    """Return llama.cpp's next-token logits after ``text`` (tokenized as chat prompts are)."""
    import llama_cpp

    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(tokens)
    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    logits = np.array(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)), dtype=np.float32)
    llm.reset()
    return logits


def load_lora(llm, path: Path):
    """Load a GGUF LoRA for ``llm``'s model without activating it; it is freed with ``llm``."""
    import llama_cpp

    if not Path(path).is_file():
        raise AdapterNotAppliedError(f"adapter {path} not found; enroll again to recreate the profile.")
    with _quiet_stderr():
        handle = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode("utf-8"))
    if handle is None:
        raise AdapterNotAppliedError(f"llama.cpp rejected the adapter {path}; export it again with `mta-local enroll`.")
    llm._stack.callback(llama_cpp.llama_adapter_lora_free, handle)
    return handle


def set_loras(llm, handles: list, scales: list[float] | None = None) -> None:
    """Make exactly ``handles`` the active adapters of ``llm`` (none for the base model) and drop cached state.

    llama-cpp-python reuses the KV cache of the longest common token prefix between the previous
    and the next prompt (it compares ``llm._input_ids``); that state was computed under the
    previous adapters, so the token count is reset and the KV memory cleared on every call.
    """
    import ctypes

    import llama_cpp

    scales = [1.0] * len(handles) if scales is None else scales
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * max(len(handles), 1))(*handles)
    values = (ctypes.c_float * max(len(handles), 1))(*scales)
    if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters if handles else None, len(handles),
                                         values if handles else None):
        raise AdapterNotAppliedError("llama.cpp failed to set the adapters; check the llama-cpp-python version (0.3.36 is tested).")
    llm.reset()
    memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
    if memory is not None:
        llama_cpp.llama_memory_clear(memory, True)


def probe_prompt(base: BaseModel, task: str, history_items: list[dict]) -> str:
    item = history_items[0]
    return render_messages(base, [{"role": "user", "content": TASKS[task].instruction(str(item[TASKS[task].input_field]))}])


def adapter_probe(base: BaseModel, adapter: Path, history) -> dict:
    """Record next-token logits of a fixed prompt with and without the adapter (top token ids)."""
    text = probe_prompt(base, history.task.name, history.items)
    plain = last_logits(load_llama(base), text)
    adapted = last_logits(load_llama(base, adapter), text)
    ids = sorted(set(np.argsort(-adapted)[:PROBE_TOKENS].tolist()) | set(np.argsort(-plain)[:PROBE_TOKENS].tolist()))
    return {"token_ids": ids, "base": [round(float(plain[i]), 4) for i in ids],
            "adapted": [round(float(adapted[i]), 4) for i in ids],
            "effect": round(float(np.abs(adapted[ids] - plain[ids]).max()), 4)}


def verify_applied(llm, profile: Profile, base: BaseModel) -> float:
    """Raise AdapterNotAppliedError unless llm's logits on the probe match the adapted record."""
    probe = profile.recipe.get("probe")
    if not probe:
        raise AdapterNotAppliedError(f"profile {profile.name!r} has no adapter probe; enroll again.")
    logits = last_logits(llm, probe_prompt(base, profile.recipe["task"], profile.history()))[probe["token_ids"]]
    to_adapted = float(np.abs(logits - np.array(probe["adapted"])).max())
    to_base = float(np.abs(logits - np.array(probe["base"])).max())
    if not to_adapted < to_base:
        raise AdapterNotAppliedError(
            f"the adapter of profile {profile.name!r} is not in effect: llama.cpp logits differ from the enrolled "
            f"adapted model by {to_adapted:.3f} and from the base model by {to_base:.3f}. Enroll again; if it persists, "
            "check the llama-cpp-python version (0.3.36 is tested)."
        )
    logger.info("adapter check: distance to adapted %.4f, to base %.4f", to_adapted, to_base)
    return to_adapted


class HistoryTurns:
    """A profile's history retrieval: puts the most relevant history items above each user turn, as in training."""

    def __init__(self, profile: Profile, history_in_prompt: int | None = None):
        task = profile.recipe["task"]
        self.retriever = Retriever(parse_history(profile.history(), source=str(profile.path), task=task))
        self.task = TASKS[task]
        self.k = profile.recipe.get("history_in_prompt", 1) if history_in_prompt is None else history_in_prompt

    def user_content(self, text: str, exclude: int | None = None) -> str:
        """Return the user turn as trained: retrieved history items above the user's instruction.

        A prompt written in the task's format is searched with its input alone (as in training);
        any other text is searched as a whole.
        """
        query = self.task.extract_input(text) or text
        return with_history(text, self.retriever.lines(query, self.k, exclude=exclude))

    def messages(self, messages: list[dict]) -> list[dict]:
        """Return ``messages`` with every user turn augmented, as ``chat`` stores its own turns."""
        return [{**m, "content": self.user_content(m["content"])} if m.get("role") == "user" else dict(m)
                for m in messages]


class ChatSession:
    """A loaded profile, ready for chat completions: the base GGUF with the profile's runtime adapter,
    or with ``folded`` the profile's folded copy of the base."""

    def __init__(self, profile: Profile, history_in_prompt: int | None = None, n_ctx: int = 2048,
                 threads: int | None = None, seed: int = 0, folded: bool = False):
        self.profile = profile
        self.base = resolve_base_model(profile.recipe["base_model"]["path"])
        if folded:
            # a per-user copy of the base with the adapters folded in decodes at the base model's speed
            from .derived import folded_base

            self.llm = load_llama(folded_base(profile, self.base), n_ctx=n_ctx, threads=threads, seed=seed)
        else:
            from .derived import ensure_adapter

            self.llm = load_llama(self.base, ensure_adapter(profile, self.base), n_ctx=n_ctx, threads=threads, seed=seed)
        verify_applied(self.llm, profile, self.base)
        self.turns = HistoryTurns(profile, history_in_prompt)
        self.messages: list[dict] = []

    def user_content(self, text: str, exclude: int | None = None) -> str:
        return self.turns.user_content(text, exclude)

    def prompt_text(self, messages: list[dict]) -> str:
        return render_messages(self.base, messages)

    def send(self, text: str, max_tokens: int = 256, temperature: float = 0.0, keep: bool = True):
        """Stream the reply to ``text`` as text pieces; with keep, the turn joins the conversation."""
        messages = self.messages + [{"role": "user", "content": self.user_content(text)}]
        reply = []
        stream = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                 temperature=temperature, stream=True)
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                reply.append(piece)
                yield piece
        if keep:
            self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]
