"""What a LoRA file in ``loras/`` is (family, trigger word), from its safetensors header alone.

Our own files say it in ``lora_studio.*`` metadata; kohya/webui files in ``ss_*`` or ``modelspec.*``;
anything else is judged by its tensor names. Tensors are never read, so listing a folder of large
files stays fast, and a path that is not a regular file is never opened (a FIFO would block).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

_DOWN_SUFFIXES = (
    ".lora_A.weight",
    ".lora_down.weight",
    ".lora.down.weight",
    ".lora_linear_layer.down.weight",
    "_lora.down.weight",
    ".hada_w1_a",
    ".lokr_w1",
    ".lokr_w1_a",
)


@dataclass(frozen=True)
class LoraInfo:
    name: str  # relative to the loras folder, e.g. "my_cat.safetensors"
    family: str | None  # a registered family name; None when the file cannot be read as a LoRA
    trigger_word: str = ""
    problem: str = ""  # why the file is not a usable LoRA; empty when it is

    @property
    def stem(self) -> str:
        return self.name.removesuffix(".safetensors")

    def as_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "trigger_word": self.trigger_word, "problem": self.problem}


def lora_family(keys: list[str], metadata: dict[str, str]) -> str | None:
    """The family a LoRA is for, from header metadata, else from tensor names; None when it holds no LoRA."""
    from families import lora_family as family_of_lora

    if not any(key.endswith(_DOWN_SUFFIXES) for key in keys):
        return None
    return family_of_lora(keys, metadata)


def read_lora_info(path: Path, name: str) -> LoraInfo:
    """Family and trigger word of the LoRA at ``path``; a file that is not one gets ``problem`` set."""
    from core.adapter_metadata import check_adapter_file
    from families import display_names
    from model_formats.safetensors_stream import SafetensorsReader

    try:
        with SafetensorsReader(path) as reader:
            keys, metadata = reader.keys(), reader.metadata
            check_adapter_file({key: info.shape for key, info in reader.tensors.items()}, metadata, file=name)
    except UserError as exc:
        return LoraInfo(name, None, problem=str(exc))
    family = lora_family(keys, metadata)
    if family is None:
        return LoraInfo(name, None, problem=f"corrupt or not a LoRA file: {name} (no {display_names()} LoRA weights)")
    trigger = metadata.get("lora_studio.trigger_word") or metadata.get("modelspec.trigger_phrase") or ""
    return LoraInfo(name, family, trigger_word=trigger.strip())
