"""Loading a LoRA file onto a pipeline, whatever its adapter type.

The file is opened once (a regular file only: a FIFO swapped in would block), its header checked by
:mod:`core.adapter_metadata`, its weights read and checked finite; only that checked state dict and the
settings built from the checked header go on to diffusers or peft, never the file's own JSON.

LoRA and DoRA files go through diffusers' ``load_lora_weights`` as a state dict; each layer's
``alpha / r`` from the header is folded into its ``lora_B`` (diffusers then applies scale 1), so no
setting of the file reaches peft. LoKr and LoHa files (peft's ``lokr_*`` / ``hada_*`` names per pipeline
component) are added with peft itself under ``adapter_name``, so the pipeline's ``set_adapters`` /
``delete_adapters`` / ``disable_lora`` treat them as any other adapter; LoKr and LoHa files in the LyCORIS
(webui) layout of other tools are converted to that layout first (:mod:`core.lycoris_files`). A load that
fails part-way is undone (:func:`remove_adapter`) before the error goes on.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.adapter_metadata import ComponentConfig, adapter_configs, check_adapter_file, lora_layer
from core.errors import UserError

LYCORIS_KEY = re.compile(r"\.(lokr_w[12](_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12])$")
_FP8 = ("float8_e4m3fn", "float8_e5m2")
# The most tensors one layer has in any layout (LoKr: w1, w1_a, w1_b, w2, w2_a, w2_b, t2, alpha), doubled.
TENSORS_PER_LAYER = 16


def _network(keys, configs: dict[str, ComponentConfig]) -> str | None:
    if not any(LYCORIS_KEY.search(key) for key in keys):
        return None
    networks = {configs[c].network if c in configs else None for c in {key.split(".", 1)[0] for key in keys}}
    if len(networks) != 1 or next(iter(networks)) not in ("lokr", "loha"):
        return None  # LyCORIS (webui) names, or no peft settings for them: not a layout peft loads
    return next(iter(networks))


def lycoris_network(keys: list[str], metadata: dict[str, str], *, file: str = "this file") -> str | None:
    """ "lokr" or "loha" for a file in peft's LoKr/LoHa layout (our main file), else None."""
    return _network(keys, adapter_configs(metadata, file=file))


def _layer_names(names: tuple[str, ...] | str) -> list[str] | str | None:
    return names if isinstance(names, str) else list(names) or None


def peft_config(config: ComponentConfig):
    """peft's LoKrConfig / LoHaConfig built from checked settings only (weights are set right after)."""
    from peft import LoHaConfig, LoKrConfig

    common = dict(
        r=config.r,
        alpha=config.alpha,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        target_modules=_layer_names(config.target_modules),
        exclude_modules=_layer_names(config.exclude_modules),
        use_effective_conv2d=config.use_effective_conv2d,
        init_weights=True,
    )
    if config.network == "lokr":
        return LoKrConfig(**common, decompose_both=config.decompose_both, decompose_factor=config.decompose_factor)
    return LoHaConfig(**common)


def component_configs(metadata: dict[str, str], *, file: str = "this file") -> dict:
    """{component: peft config} of a LoKr/LoHa file's checked ``lora_adapter_metadata`` header."""
    configs = adapter_configs(metadata, file=file)
    return {component: peft_config(config) for component, config in configs.items() if config.network != "lora"}


def read_lora_state(path: Path, *, max_tensors: int | None = None) -> tuple[dict, dict[str, str]]:
    """(tensors, header metadata) of the LoRA file at ``path``, read in one opening; fp8 weights come back
    as float32 (nothing here computes in fp8). UserError for a file that is not a finite LoRA, or that holds
    more than ``max_tensors`` tensors (checked on the header, before any is read)."""
    import torch

    from model_formats.safetensors_stream import SafetensorsReader

    name = Path(path).name
    with SafetensorsReader(path) as reader:
        metadata = dict(reader.metadata)
        shapes = {key: info.shape for key, info in reader.tensors.items()}
        if max_tensors is not None and len(shapes) > max_tensors:
            raise UserError(
                f"{name} holds {len(shapes)} tensors, more than any LoRA for the loaded model has ({max_tensors}); "
                "it is not a LoRA for this model. Remove it from the LoRA folder."
            )
        check_adapter_file(shapes, metadata, file=name)
        state = {key: reader.get(key) for key in reader.keys()}  # noqa: SIM118 - the reader is no dict
    for key, tensor in state.items():
        if str(tensor.dtype).removeprefix("torch.") in _FP8:
            state[key] = tensor = tensor.float()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"LoRA {name!r} holds NaN or infinite weights ({key}); it would make black images. "
                "Train it again (a lower learning rate, or bf16 instead of fp16) or remove it."
            )
    return state, metadata


def scaled_lora_state(state: dict, configs: dict[str, ComponentConfig]) -> dict:
    """``state`` with each layer's header scale folded into its up weights (``lora_B`` weight and bias,
    or the older ``.up.weight`` spellings)."""
    out = dict(state)
    for key, tensor in state.items():
        config = configs.get(key.partition(".")[0])
        layer = lora_layer(key)
        if config is None or config.network != "lora" or layer is None or layer[1] != "up":
            continue
        scale = config.scale_of(layer[0])
        if scale != 1.0:
            out[key] = (tensor.float() * scale).to(tensor.dtype)
    return out


def outer_modules(model):
    """``(name, module)`` of ``model``'s named modules, the root and the insides of layers an adapter already
    wraps left out (a wrapping layer comes as itself: its own modules are no layers of the model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer) for outer in wrapped[-1:]):
            continue  # named_modules walks depth first: the last wrapping layer is the only one to look at
        if isinstance(module, BaseTunerLayer):
            wrapped.append(f"{name}.")
        yield name, module


def _adapted_layers(model, config) -> set[str]:
    """The layers of ``model`` that peft's ``add_adapter(config)`` would adapt (as peft matches them),
    leaving out the insides of layers already adapted by another adapter."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return {name for name, _ in outer_modules(model) if check_target_module_exists(config, name)}


def check_layers_present(model, config, part: dict, *, file: str, component: str) -> None:
    """peft allocates the header's rank on every layer its target_modules match: each of them must have
    weights in the file (else a file holding one layer could make peft allocate thousands), and each
    layer of the file must be one of them."""
    held = {LYCORIS_KEY.split(key)[0] for key in part if LYCORIS_KEY.search(key)}
    adapted = _adapted_layers(model, config)
    differ = sorted(adapted ^ held)
    if differ:
        raise UserError(
            f"{file}: its header adapts {len(adapted)} layers of the {component} but the file holds weights "
            f"for {len(held)} (first difference: {differ[0][:120]}). The file is damaged or made for another "
            "model: export it again, or remove it from the LoRA folder."
        )


def _add_lycoris(pipe, state: dict, configs: dict[str, ComponentConfig], *, adapter_name: str, file: str) -> None:
    from peft import set_peft_model_state_dict

    for component in sorted({key.split(".", 1)[0] for key in state}):
        model = getattr(pipe, component, None)
        if model is None:
            raise ValueError(f"the pipeline has no {component}")
        part = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == component}
        config = peft_config(configs[component])
        check_layers_present(model, config, part, file=file, component=component)
        model.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, part, adapter_name=adapter_name)
        missing = [key for key in getattr(result, "missing_keys", []) if f".{adapter_name}" in key]
        if getattr(result, "unexpected_keys", None) or missing:
            raise ValueError(f"{component} layers do not match ({(result.unexpected_keys or missing)[:2]})")


def _add_webui_lycoris(pipe, state: dict, configs: dict[str, ComponentConfig], *, adapter_name: str, file: str):
    """:func:`_add_lycoris` for a file converted from the LyCORIS layout; what peft refuses, and any layer
    whose rank or scale came out other than planned, is the file's problem, said as such."""
    from core.lycoris_files import check_applied

    try:
        _add_lycoris(pipe, state, configs, adapter_name=adapter_name, file=file)
    except (ValueError, RuntimeError) as exc:
        raise UserError(
            f"{file}: peft cannot build this LoKr/LoHa's layers as the file holds them "
            f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}). "
            "Use ComfyUI or Forge for this file, or remove it from the LoRA folder."
        ) from exc
    check_applied(pipe, configs, adapter_name=adapter_name, file=file)


def load_lora_file(pipe, path: Path, *, adapter_name: str | None = None) -> None:
    """Load the LoRA/DoRA/LoKr/LoHa file ``path`` onto ``pipe`` as adapter ``adapter_name``; a LoKr/LoHa in
    the LyCORIS (webui) layout is converted to peft's first (:mod:`core.lycoris_files`). On failure the
    adapter's layers are removed again (see :func:`remove_adapter`) and the error is raised."""
    from core.lycoris_files import lycoris_adapter

    layers = _layer_count(pipe)
    state, metadata = read_lora_state(path, max_tensors=TENSORS_PER_LAYER * layers if layers else None)
    name = Path(path).name
    configs = adapter_configs(metadata, file=name)
    network = _network(list(state), configs)
    webui = network is None and any(LYCORIS_KEY.search(key) for key in state)
    if webui:
        state, configs = lycoris_adapter(pipe, state, metadata, file=name)  # injects nothing
    try:
        if webui:
            _add_webui_lycoris(pipe, state, configs, adapter_name=adapter_name or "default", file=name)
        elif network is None:
            pipe.load_lora_weights(scaled_lora_state(state, configs), adapter_name=adapter_name)
        else:
            _add_lycoris(pipe, state, configs, adapter_name=adapter_name or "default", file=name)
    except BaseException:
        if adapter_name is not None:
            remove_adapter(pipe, adapter_name)
        raise


def _layer_count(pipe) -> int:
    """The Linear and Conv layers of ``pipe``: a LoRA file holds a few tensors per layer at most."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    models = _components(pipe) if hasattr(pipe, "components") else []
    return sum(isinstance(module, kinds) for model in models for module in model.modules())


def _components(pipe) -> list:
    import torch

    return [model for model in pipe.components.values() if isinstance(model, torch.nn.Module)]


def remove_adapter(pipe, adapter_name: str) -> bool:
    """Take ``adapter_name`` out of every component of ``pipe``, however far its load got: its layers
    (a layer left with no adapter is replaced by the layer it wrapped), its config, and the "has
    adapters" flag diffusers sets before injecting. True when nothing of it is left."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in _components(pipe):
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer) and adapter_name in child._all_available_adapter_names():
                    child.delete_adapter(adapter_name)
                    if not child._all_available_adapter_names():
                        setattr(parent, child_name, child.get_base_layer())
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(adapter_name, None)
            if not configs:
                del model.peft_config
        if getattr(model, "_hf_peft_config_loaded", False) and not getattr(model, "peft_config", None):
            model._hf_peft_config_loaded = False
    return not adapter_left(pipe, adapter_name)


def adapter_left(pipe, adapter_name: str) -> bool:
    """Whether any layer or config of ``pipe`` still carries ``adapter_name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in _components(pipe):
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            return True
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in module._all_available_adapter_names():
                return True
    return False
