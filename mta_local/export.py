"""Export a profile's adapters for llama.cpp (GGUF), Ollama (Modelfile) and transformers (PEFT).

- gguf: the combined adapter (merged + stacked, ranks concatenated, scaling folded into
  ``.lora_b``); with ``separate`` also the merged and the stacked adapter as files of their own.
- ollama: a folder with the combined GGUF and a Modelfile that names the base GGUF, that adapter
  and the base model's ChatML template in Ollama's Go-template syntax.
- peft: adapter_config.json + adapter_model.safetensors, one LoRA of rank sum(ranks) with the
  scaling folded into lora_B and lora_alpha = r, so PEFT's scaling is exactly 1.

Every file is written next to its destination and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExportError, UnsupportedModelError
from .gguf_adapter import write_adapter
from .merge import LoraWeights
from .models import BaseModel, resolve_base_model
from .profile import Profile
from .templates import render_messages
from .verify import combined_adapter, merged_adapter

logger = logging.getLogger(__name__)

FORMATS = ("gguf", "ollama", "peft")
COMBINED_GGUF = "adapter.gguf"
MERGED_GGUF = "merged.gguf"
STACKED_GGUF = "stacked.gguf"


@dataclass
class ExportResult:
    """Files written by one export."""

    kind: str  # gguf, ollama or peft
    folder: Path
    files: list[Path] = field(default_factory=list)
    command: str | None = None  # the `ollama create` command, for ollama exports


def profile_base(profile: Profile) -> BaseModel:
    return resolve_base_model(profile.recipe["base_model"]["path"])


def adapter_metadata(profile: Profile, part: str) -> dict:
    """Return the GGUF metadata of an exported adapter: profile, bank id, anchors and weights, configs."""
    recipe = profile.recipe
    data = {key: recipe[key] for key in ("profile", "task", "bank", "anchors", "merge", "stack") if key in recipe}
    data["part"] = part  # combined, merged or stacked
    data["base_model_sha256"] = recipe["base_model"]["sha256"]
    return data


def default_out(profile: Profile, kind: str) -> Path:
    return profile.path / "export" / kind


def export_gguf(profile: Profile, out: Path, separate: bool = False, base: BaseModel | None = None) -> ExportResult:
    """Write the combined adapter (and with ``separate`` the merged and stacked adapters) as GGUF LoRAs.

    ``write_adapter`` reads each file back with gguf.GGUFReader and checks it against the base.
    """
    base = base or profile_base(profile)
    merged, stacked = merged_adapter(profile), profile.stacked()
    files = [write_adapter(out / COMBINED_GGUF, combined_adapter(profile), base, adapter_metadata(profile, "combined"))]
    if separate:
        files.append(write_adapter(out / MERGED_GGUF, merged, base, adapter_metadata(profile, "merged")))
        files.append(write_adapter(out / STACKED_GGUF, stacked, base, adapter_metadata(profile, "stacked")))
    return ExportResult("gguf", out, files)


# ---------------------------------------------------------------------------------------------
# ollama

def chatml_parts(base: BaseModel) -> tuple[str, str]:
    """Return (default system prompt, stop string) of a ChatML chat template, checked by rendering it.

    Raise UnsupportedModelError for templates that are not ChatML, because the Ollama template
    below reproduces ChatML only.
    """
    marker = "\x00user\x00"
    rendered = render_messages(base, [{"role": "user", "content": marker}])
    head, _, tail = rendered.partition(f"<|im_start|>user\n{marker}<|im_end|>\n")
    system = head.removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>\n")
    if tail != "<|im_start|>assistant\n" or not head.startswith("<|im_start|>system\n") or "<|im_" in system:
        raise UnsupportedModelError(f"{base.path.name}: the chat template is not ChatML; the Ollama export "
                                    "supports ChatML templates only. Use --to gguf and your own Modelfile TEMPLATE.")
    return system, "<|im_end|>"


def ollama_template(default_system: str) -> str:
    """Return the ChatML template in Ollama's Go-template syntax.

    Like the GGUF's Jinja template, it adds the default system turn unless the first message is a
    system message, then renders every message and opens the assistant turn.
    """
    return (
        '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
        + default_system + "<|im_end|>\n"
        + "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        + "{{ end }}<|im_start|>assistant\n"
    )


def _quote(path: Path) -> str:
    return json.dumps(str(path.resolve()))  # a double-quoted string: spaces and quotes survive


def modelfile_text(base: BaseModel, adapter: Path) -> str:
    system, stop = chatml_parts(base)
    return (
        f"FROM {_quote(base.path)}\n"
        f"ADAPTER {_quote(adapter)}\n"
        f'TEMPLATE """{ollama_template(system)}"""\n'
        f"PARAMETER stop {json.dumps(stop)}\n"
    )


def export_ollama(profile: Profile, out: Path, model_name: str | None = None) -> ExportResult:
    """Write the combined GGUF and a Modelfile for it; return them with the `ollama create` command."""
    base = profile_base(profile)
    result = export_gguf(profile, out, base=base)
    modelfile = out / "Modelfile"
    _write_text(modelfile, modelfile_text(base, result.files[0]))
    name = model_name or f"mta-{profile.name.lower()}"
    command = f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile.resolve()))}"
    return ExportResult("ollama", out, [modelfile] + result.files, command)


# ---------------------------------------------------------------------------------------------
# peft

def peft_config(adapter: LoraWeights, base: BaseModel) -> dict:
    """Return adapter_config.json for ``adapter`` with its scaling folded: lora_alpha = r, so scaling is 1."""
    from peft import LoraConfig

    modules = sorted({module.rsplit(".", 1)[-1] for module in adapter.tensors})
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.rank, target_modules=modules, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base.name,
                        use_rslora=False, use_dora=False)
    data = config.to_dict()
    return {key: (sorted(value) if isinstance(value, set) else value) for key, value in data.items()}


def export_peft(profile: Profile, out: Path) -> ExportResult:
    """Write merged + stacked as one PEFT LoRA (float32) that PeftModel.from_pretrained loads on the base."""
    import torch
    from safetensors.torch import save_file

    base = profile_base(profile)
    folded = combined_adapter(profile).folded()
    out.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = out / "adapter_config.json", out / "adapter_model.safetensors"
    _write_text(config_path, json.dumps(peft_config(folded, base), indent=1, default=str) + "\n")
    partial = weights_path.with_name(f".{weights_path.name}.partial")
    save_file(folded.to_peft_state_dict(torch.float32), str(partial), metadata={"format": "pt"})
    os.replace(partial, weights_path)
    logger.info("PEFT adapter %s: rank %d, %d modules", out, folded.rank, len(folded.tensors))
    return ExportResult("peft", out, [config_path, weights_path])


def export_profile(profile: Profile, kind: str, out: Path | None = None, separate: bool = False,
                   model_name: str | None = None) -> ExportResult:
    """Export a profile in one of FORMATS into ``out`` (default: the profile's export/<kind> folder)."""
    out = Path(out) if out is not None else default_out(profile, kind)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the export folder {out}: {exc.strerror}. "
                          "Pass --out with a folder path you can write to.") from None
    if kind == "gguf":
        return export_gguf(profile, out, separate=separate)
    if kind == "ollama":
        return export_ollama(profile, out, model_name)
    if kind == "peft":
        return export_peft(profile, out)
    raise ValueError(f"unknown export format {kind!r}; choose one of {', '.join(FORMATS)}")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
