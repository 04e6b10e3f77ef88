"""The chat template shared by training and serving.

Training renders each prompt with the same llama-cpp-python formatter that ``chat`` hands to
llama.cpp, built from the template stored in the base GGUF. The text the model is trained on and
the text it is served are therefore the same string.
"""

from __future__ import annotations

from .models import BaseModel


def chat_formatter(base: BaseModel):
    """Return llama-cpp-python's Jinja2ChatFormatter for the base model's own chat template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if not base.chat_template:
        raise ValueError(f"{base.path}: the GGUF has no tokenizer.chat_template; use an instruct model.")
    return Jinja2ChatFormatter(template=base.chat_template, eos_token=base.eos_token, bos_token=base.bos_token)


def render_messages(base: BaseModel, messages: list[dict]) -> str:
    """Return the exact prompt string llama.cpp receives for ``messages`` (generation prompt added)."""
    return chat_formatter(base)(messages=messages).prompt


def prompt_renderer(base: BaseModel):
    """Return a function user_text -> rendered single-turn prompt."""
    formatter = chat_formatter(base)
    return lambda text: formatter(messages=[{"role": "user", "content": text}]).prompt
