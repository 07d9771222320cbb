"""Loading a LoRA file onto a pipeline, whatever its adapter type.

LoRA and DoRA files go through diffusers' ``load_lora_weights``. LoKr and LoHa files (peft's
``lokr_*`` / ``hada_*`` names per pipeline component, their peft config in the
``lora_adapter_metadata`` header) are loaded with peft itself: the adapter is added to each
component and its weights set, under ``adapter_name``, so the pipeline's ``set_adapters`` /
``delete_adapters`` / ``disable_lora`` treat it as any other adapter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from core.errors import UserError

LYCORIS_KEY = re.compile(r"\.(lokr_w[12](_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12])$")
LYCORIS_TYPES = {"LOKR": "lokr", "LOHA": "loha"}


def lycoris_network(keys: list[str], metadata: dict[str, str]) -> str | None:
    """ "lokr" or "loha" for a file in peft's LoKr/LoHa layout (our main file), else None."""
    if not any(LYCORIS_KEY.search(key) for key in keys):
        return None
    if any(key.split(".", 1)[0] not in _components(metadata) for key in keys):
        return None  # LyCORIS (webui) names: not a layout peft loads
    header = metadata.get("lora_adapter_metadata", "")
    return next((name for key, name in LYCORIS_TYPES.items() if f'"{key}"' in header), None)


def _components(metadata: dict[str, str]) -> set[str]:
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return set()
    return {key.split(".", 1)[0] for key in packed if key.endswith(".peft_type")}


def component_configs(metadata: dict[str, str]) -> dict:
    """{component: peft config} from diffusers' packed ``lora_adapter_metadata`` header."""
    import dataclasses

    from peft import LoHaConfig, LoKrConfig

    classes = {"LOKR": LoKrConfig, "LOHA": LoHaConfig}
    packed = json.loads(metadata["lora_adapter_metadata"])
    configs = {}
    for component in _components(metadata):
        fields = {key.split(".", 1)[1]: value for key, value in packed.items() if key.startswith(f"{component}.")}
        cls = classes[fields["peft_type"]]
        names = {f.name for f in dataclasses.fields(cls) if f.init} - {"peft_type"}
        configs[component] = cls(**{key: value for key, value in fields.items() if key in names})
    return configs


def load_lycoris_file(pipe, path: Path, *, adapter_name: str) -> None:
    """Add the LoKr/LoHa adapter of ``path`` to each pipeline component it names."""
    from peft import set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is no dict
    for component, config in component_configs(metadata).items():
        model = getattr(pipe, component, None)
        if model is None:
            raise ValueError(f"the pipeline has no {component}")
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == component}
        model.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        missing = [key for key in getattr(result, "missing_keys", []) if f".{adapter_name}" in key]
        if getattr(result, "unexpected_keys", None) or missing:
            raise ValueError(f"{component} layers do not match ({(result.unexpected_keys or missing)[:2]})")


def load_lora_file(pipe, path: Path, *, adapter_name: str | None = None) -> None:
    """Load the LoRA/DoRA/LoKr/LoHa file ``path`` onto ``pipe`` as adapter ``adapter_name``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118 - safe_open is no dict
        network = lycoris_network(keys, handle.metadata() or {})
    if network is None and any(LYCORIS_KEY.search(key) for key in keys):
        raise UserError(
            f"{Path(path).name} is a LoKr/LoHa in the LyCORIS (webui) layout, which Generate cannot apply yet; "
            "use the main file this app trains (peft layout), or ComfyUI/Forge for this one."
        )
    if network is None:
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    else:
        load_lycoris_file(pipe, path, adapter_name=adapter_name or "default")
