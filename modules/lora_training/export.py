"""LoRA files that load everywhere: kohya/webui export, diffusers export, inspection, verification.

Every LoRA is reduced to the same picture: per layer, ``down`` (A), ``up`` (B) and the
scale ``alpha / rank``. Export writes that picture in another key layout; verification
reads the written file back through diffusers' own loader and compares each layer's
effective weight change ``up @ down * scale`` with the source's.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from core.atomic import atomic_path
from core.errors import UserError
from core.sdxl_single_file import unet_key_to_original

FORMATS = ("kohya", "diffusers")
SDXL_LAYERS_PER_BLOCK = 2
VERIFY_TOLERANCE = 1e-3  # relative to the largest change in the LoRA; fp16 storage rounds at ~1e-3


@dataclass
class LoraLayer:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None  # None: the file gave none (loaders then assume alpha = rank)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta(self) -> torch.Tensor:
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        return up @ down * self.scale


@dataclass
class LoraFile:
    path: Path
    family: str  # sdxl | flux
    format: str  # diffusers | kohya
    layers: dict[str, LoraLayer]  # "unet.<diffusers module>" / "transformer.<module>" / "text_encoder.<module>"
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        pairs: dict[tuple, int] = {}
        for layer in self.layers.values():
            key = (layer.rank, layer.alpha)
            pairs[key] = pairs.get(key, 0) + 1
        return {
            f"rank {r}, alpha {'missing' if a is None else f'{a:g}'}": n for (r, a), n in sorted(pairs.items(), key=str)
        }


# ----- reading -------------------------------------------------------------------------
_DOWN_SUFFIXES = (
    ".lora_A.weight",
    ".lora.down.weight",
    ".lora_down.weight",
    ".lora_linear_layer.down.weight",
    "_lora.down.weight",  # diffusers' old attention-processor names (to_q_lora, to_out_lora)
)


def _split_down_key(key: str) -> tuple[str, str] | None:
    """(module, up-weight key) for a down-weight key, module names normalised across formats."""
    suffix = next((s for s in _DOWN_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None
    stem = key[: -len(suffix)]
    up_key = stem + suffix.replace("lora_A", "lora_B").replace("down", "up")
    module = stem.replace(".processor.", ".")
    if suffix == "_lora.down.weight":
        head, _, projection = module.rpartition(".")
        if module.startswith("text_encoder"):
            module = f"{head}.{projection[len('to_') :]}_proj"  # to_q → q_proj, to_out → out_proj
        elif projection == "to_out":
            module += ".0"
    # transformers 5 CLIP models may or may not keep the text_model level: compare without it.
    module = module.replace(".text_model.", ".")
    return module, up_key


def _layers(state: dict, alpha_for) -> dict[str, LoraLayer]:
    layers = {}
    for key, value in state.items():
        split = _split_down_key(key)
        if split is None:
            continue
        module, up_key = split
        layers[module] = LoraLayer(down=value, up=state[up_key], alpha=alpha_for(key, module))
    return layers


def _family_from_keys(keys: list[str], metadata: dict) -> str:
    if metadata.get("lora_studio.family") in ("sdxl", "flux"):
        return metadata["lora_studio.family"]
    joined = " ".join(keys[:2000])
    if (
        "transformer." in joined
        or "double_blocks" in joined
        or "single_blocks" in joined
        or "lora_transformer_" in joined
    ):
        return "flux"
    return "sdxl"


def _adapter_alpha(metadata: dict, part: str) -> float | None:
    """``lora_alpha`` from diffusers' adapter metadata for ``part`` (unet, transformer, text_encoder...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    value = json.loads(raw).get(f"{part}.lora_alpha")
    return float(value) if value is not None else None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except Exception as exc:
        raise UserError(f"{Path(path).name} is not a readable .safetensors LoRA ({exc}).") from exc


def read_lora(path: Path) -> LoraFile:
    """Any LoRA we can load (ours, diffusers, kohya/webui, ComfyUI), converted by diffusers' own code."""
    path = Path(path)
    state, metadata = _read_safetensors(path)
    if not state:
        raise UserError(f"{path.name} holds no tensors.")
    keys = list(state)
    family = _family_from_keys(keys, metadata)
    is_kohya = all(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys)
    if not is_kohya:
        layers = _layers(state, lambda key, module: _adapter_alpha(metadata, module.split(".")[0]))
        return LoraFile(path, family, "diffusers", layers, metadata)
    converted, alphas = _convert_with_diffusers(state, family)
    alphas = alphas or {}
    layers = _layers(converted, lambda key, module: alphas.get(key + ".alpha", alphas.get(f"{module}.alpha")))
    return LoraFile(path, family, "kohya", layers, metadata)


def _convert_with_diffusers(state: dict, family: str) -> tuple[dict, dict | None]:
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        config = SimpleNamespace(layers_per_block=SDXL_LAYERS_PER_BLOCK)
        return StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=config)
    from diffusers import FluxPipeline

    converted = FluxPipeline.lora_state_dict(dict(state))
    # Flux's converter folds alpha into the weights, so the scale is already 1.
    return converted, {
        k[: -len(".lora_A.weight")] + ".alpha": float(v.shape[0])
        for k, v in converted.items()
        if k.endswith(".lora_A.weight")
    }


# ----- writing -------------------------------------------------------------------------
def _kohya_name(module: str) -> str:
    """``unet.down_blocks.1...`` → ``lora_unet_input_blocks_4_1_...`` (original SDXL block names)."""
    part, _, rest = module.partition(".")
    if part == "unet":
        original = unet_key_to_original(rest + ".weight", SDXL_LAYERS_PER_BLOCK)[: -len(".weight")]
        return "lora_unet_" + original.replace(".", "_")
    prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part]
    return prefix + "text_model_" + rest.replace(".", "_")


# Flux layers the kohya-style "lora_transformer_" layout (read by ComfyUI and diffusers) can carry.
_FLUX_KOHYA_LAYERS = re.compile(
    r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
)


def _flux_kohya_name(module: str) -> str:
    part, _, rest = module.partition(".")
    if part != "transformer":
        return "lora_te1_text_model_" + rest.replace(".", "_")
    if not _FLUX_KOHYA_LAYERS.fullmatch(rest):
        raise UserError(
            f"Flux layer {rest!r} has no kohya-layout equivalent that other tools read; "
            "train with LoRA layers 'attention' for a webui export, or use the diffusers format."
        )
    return "lora_transformer_" + rest.replace(".", "_")


def _tag_frequency(metadata: dict) -> str:
    return metadata.get("lora_studio.tag_frequency") or json.dumps({})


def kohya_metadata(lora: LoraFile, *, rank: int, alpha: float) -> dict[str, str]:
    meta = lora.metadata
    resolution = meta.get("lora_studio.resolution") or "1024"
    title = meta.get("modelspec.title") or lora.path.stem
    trigger = meta.get("lora_studio.trigger_word", meta.get("modelspec.trigger_phrase", ""))
    architecture = "stable-diffusion-xl-v1-base/lora" if lora.family == "sdxl" else "flux-1-dev/lora"
    out = {
        "ss_base_model_version": "sdxl_base_v1-0" if lora.family == "sdxl" else "flux1",
        "ss_network_module": "networks.lora" if lora.family == "sdxl" else "networks.lora_flux",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_tag_frequency": _tag_frequency(meta),
        "ss_sd_model_name": meta.get("lora_studio.base_model", ""),
        "ss_steps": meta.get("lora_studio.steps", ""),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if lora.family == "sdxl"
        else "https://github.com/black-forest-labs/flux",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger,
        "modelspec.date": meta.get("modelspec.date") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "epsilon" if lora.family == "sdxl" else "flow",
    }
    out.update({k: v for k, v in meta.items() if k.startswith("lora_studio.")})
    return out


def to_kohya(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    name_of = _kohya_name if lora.family == "sdxl" else _flux_kohya_name
    for module, layer in lora.layers.items():
        name = name_of(module)
        tensors[f"{name}.lora_down.weight"] = layer.down.to(torch.float16).contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.to(torch.float16).contiguous()
        alpha = layer.alpha if layer.alpha is not None else float(layer.rank)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    first = next(iter(lora.layers.values()))
    alpha = first.alpha if first.alpha is not None else float(first.rank)
    return tensors, kohya_metadata(lora, rank=first.rank, alpha=alpha)


def to_diffusers(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Diffusers/PEFT keys; each layer's scale is folded into ``up`` so no alpha can be lost."""
    tensors = {}
    for module, layer in lora.layers.items():
        tensors[f"{module}.lora_A.weight"] = layer.down.to(torch.float16).contiguous()
        tensors[f"{module}.lora_B.weight"] = (layer.up.float() * layer.scale).to(torch.float16).contiguous()
    metadata = {k: v for k, v in lora.metadata.items() if not k.startswith("ss_")}
    metadata.pop("lora_adapter_metadata", None)
    return tensors, metadata


# ----- verification --------------------------------------------------------------------
@dataclass(frozen=True)
class Verification:
    max_difference: float
    largest_change: float
    layers: int

    @property
    def relative(self) -> float:
        return self.max_difference / self.largest_change if self.largest_change else 0.0

    @property
    def ok(self) -> bool:
        return self.relative <= VERIFY_TOLERANCE


def compare(source: LoraFile, exported: LoraFile) -> Verification:
    src = {m: layer.delta() for m, layer in source.layers.items()}
    out = {m: layer.delta() for m, layer in exported.layers.items()}
    if set(src) != set(out):
        missing = sorted(set(src) ^ set(out))[:3]
        raise UserError(f"Export check failed: layers differ after reloading ({missing}).")
    worst = max((src[m] - out[m]).abs().max().item() for m in src)
    largest = max(d.abs().max().item() for d in src.values())
    return Verification(max_difference=worst, largest_change=largest, layers=len(src))


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    verification: Verification


def default_export_path(source: Path, fmt: str) -> Path:
    source = Path(source)
    return source.parent / ("webui" if fmt == "kohya" else "diffusers") / source.name


def export_lora(source_path: Path, *, fmt: str, out: Path | None = None) -> ExportResult:
    """Write ``source_path`` in ``fmt`` (atomically), read it back, verify the weight changes match."""
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    from safetensors.torch import save_file

    source = read_lora(source_path)
    tensors, metadata = to_kohya(source) if fmt == "kohya" else to_diffusers(source)
    out = Path(out) if out else default_export_path(source_path, fmt)
    if out.resolve() == Path(source_path).resolve():
        raise UserError("The export would overwrite its source; choose another --out.")
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        check = compare(source, read_lora(tmp))
        if not check.ok:
            raise UserError(
                f"Export check failed: the exported LoRA changes weights differently from the source "
                f"(max difference {check.max_difference:.3g}, {check.relative:.2%} of the largest change). "
                "Nothing was written."
            )
    return ExportResult(path=out, format=fmt, verification=check)


# ----- inspection ----------------------------------------------------------------------
def inspect_lora(path: Path) -> str:
    lora = read_lora(path)
    meta = lora.metadata
    lines = [f"{Path(path).name}: {lora.family.upper()} LoRA, {lora.format} format, {len(lora.layers)} layers"]
    for pair, count in lora.summary().items():
        lines.append(f"  {pair}: {count} layers")
    targets = sorted({re.sub(r"^.*?\.(?=[a-z_]+(\.\d+)?$)", "", m.split(".", 1)[1]) for m in lora.layers})
    lines.append(f"  target modules: {', '.join(targets)}")
    trigger = meta.get("lora_studio.trigger_word") or meta.get("modelspec.trigger_phrase")
    if not trigger and meta.get("ss_tag_frequency"):
        try:
            tags = json.loads(meta["ss_tag_frequency"])
            counts: dict[str, int] = {}
            for dataset in tags.values():
                for tag, n in dataset.items():
                    counts[tag] = counts.get(tag, 0) + n
            trigger = ", ".join(t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
        except (ValueError, AttributeError):
            pass
    lines.append(f"  trigger words: {trigger or '(none recorded)'}")
    shown = set()
    for key, label in (
        ("lora_studio.base_model", "base model"),
        ("ss_sd_model_name", "base model"),
        ("lora_studio.steps", "steps"),
        ("ss_steps", "steps"),
        ("lora_studio.resolution", "resolution"),
        ("ss_resolution", "resolution"),
    ):
        if meta.get(key) and label not in shown:
            shown.add(label)
            lines.append(f"  {label}: {meta[key]}")
    if any(layer.alpha is None for layer in lora.layers.values()):
        lines.append(
            "  WARNING: no alpha recorded for some layers; loaders will assume alpha = rank (full strength), "
            "which may not be what it was trained with."
        )
    verbose = [f"    {m}: rank {layer.rank}, alpha {layer.alpha}" for m, layer in sorted(lora.layers.items())[:12]]
    lines += ["  first layers:", *verbose]
    return "\n".join(lines)
