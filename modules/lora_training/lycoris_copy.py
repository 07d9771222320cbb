"""The webui copy of LoKr, LoHa and DoRA LoRAs, in the LyCORIS key layout ComfyUI, Forge and A1111 read.

One webui module per diffusers module (``family.lycoris_name``), never fused:

- LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` as peft trained them, and ``alpha``:
  readers scale by alpha over the rows of ``hada_w1_b``, which is peft's alpha / r.
- LoKr: ``lokr_w1`` (or ``lokr_w1_a``/``_b``) and ``lokr_w2`` (or ``_a``/``_b``); readers scale by alpha over
  the rank of a decomposed factor, and by 1 when both factors are full: peft's alpha / r is then folded into
  ``lokr_w1`` and no alpha is written.
- DoRA: ``lora_down``, ``lora_up``, ``alpha`` and ``dora_scale``, one value per output row. peft divides the
  magnitude by the row norm of the merged weight W + ΔW; ComfyUI and Forge divide a per-row ``dora_scale``
  by the row norm of the base weight W. The copy therefore holds magnitude × ‖W‖ / ‖W + ΔW‖, which needs
  the base model's weights (``base_weight``).

The copy is read back and each module's weight change, computed as ComfyUI computes it, is compared with
the main file's, computed as peft does, before it replaces anything. Changes are compared on random probe
vectors (as the LoRA export does), from the factors, never built as a full matrix; DoRA's row norms come
from the low-rank factors too: a full-size copy holds one base weight at a time and little beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from core.adapter_files import LYCORIS_KEY, component_configs, lycoris_network
from core.adapter_metadata import check_adapter_file
from core.atomic import atomic_path
from core.errors import UserError
from families import family
from families.clip_names import without_clip_level
from model_formats.safetensors_stream import SafetensorsReader, TensorSpec, write_safetensors_to

OUT_DTYPE = torch.float16
EPS = torch.finfo(torch.float32).eps  # ComfyUI adds the eps of its (fp32) working dtype to the norm
BaseWeight = Callable[[str], torch.Tensor]


# ----- the main file, as peft computes it ------------------------------------------------------
def _kron_factors(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return w1, w2


def lycoris_response(tensors: dict[str, torch.Tensor], probes: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW @ probes (in, k) of one LoKr or LoHa linear layer, from its factors, without building ΔW (out, in):
    LoKr's kron(w1, w2) @ x is w1 @ X @ w2ᵀ with x read as X (in of w1, in of w2); LoHa's
    ((a1 b1) ⊙ (a2 b2)) @ x is, per output row, a1 (b1 diag(x) b2ᵀ) a2ᵀ."""
    t = {name: value.float() for name, value in tensors.items()}
    if "hada_w1_a" in t:
        inner = (t["hada_w1_b"] * probes.T.unsqueeze(1)) @ t["hada_w2_b"].T  # (k, rank 1, rank 2)
        return ((t["hada_w1_a"] @ inner) * t["hada_w2_a"]).sum(dim=-1).T * scale
    w1, w2 = _kron_factors(t)
    grouped = probes.reshape(w1.shape[1], w2.shape[1], -1)  # (in of w1, in of w2, k)
    inner = torch.einsum("mnk,on->mok", grouped, w2)
    return torch.einsum("lm,mok->lok", w1, inner).reshape(w1.shape[0] * w2.shape[0], -1) * scale


def comfy_scale(t: dict[str, torch.Tensor]) -> float:
    """The factor ComfyUI applies to a LoKr or LoHa product: alpha over the rank of ``hada_w1_b`` (LoHa) or of
    the decomposed LoKr factor (``w2``'s when both are), 1 without an alpha or with both LoKr factors full."""
    alpha = t["alpha"].item() if "alpha" in t else None
    if alpha is None:
        return 1.0
    if "hada_w1_b" in t:
        return alpha / t["hada_w1_b"].shape[0]
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    return alpha / dim if dim is not None else 1.0


def lycoris_parts(reader: SafetensorsReader) -> dict[str, tuple[dict[str, str], float]]:
    """{diffusers module: ({peft parameter: key in the file}, peft scale)} of a LoKr/LoHa main file."""
    configs = component_configs(reader.metadata, file=reader.path.name)
    parts: dict[str, tuple[dict[str, str], float]] = {}
    for key in reader.keys():  # noqa: SIM118 - the reader is no dict
        match = LYCORIS_KEY.search(key)
        if match is None:
            raise UserError(f"{reader.path.name}: {key} is not a LoKr/LoHa weight.")
        stem = key[: match.start()]
        config = configs[stem.split(".", 1)[0]]
        keys, _ = parts.setdefault(without_clip_level(stem), ({}, config.alpha / config.r))
        keys[match.group(1)] = key
    return parts


# ----- the copy, as ComfyUI reads it -----------------------------------------------------------
def _lycoris_copy(tensors: dict[str, torch.Tensor], scale: float, rank: int) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    if any(name.endswith("_b") for name in tensors):
        out["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    else:  # LoKr with both factors full: readers apply it at scale 1
        out["lokr_w1"] = tensors["lokr_w1"].float() * scale
    return out


def dora_norms(base: torch.Tensor, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms of W and of W + ΔW (ΔW = scale · up @ down) from the low-rank factors, with no (out, in)
    temporary beside W: ‖W + ΔW‖² = ‖W‖² + 2 scale rows(W downᵀ ⊙ up) + scale² rows(up (down downᵀ) ⊙ up)."""
    down, up = layer.down.float(), layer.up.float()
    base_norm = torch.linalg.vector_norm(base, dim=1)
    cross = ((base @ down.T) * up).sum(dim=1) * layer.scale
    change = ((up @ (down @ down.T)) * up).sum(dim=1) * layer.scale**2
    return base_norm, (base_norm.square() + 2 * cross + change).clamp_min(0).sqrt()


def _dora_copy(layer, magnitude: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    base_norm, merged_norm = norms
    return {
        "lora_down.weight": layer.down,
        "lora_up.weight": layer.up,
        "alpha": torch.tensor(layer.scale * layer.rank, dtype=torch.float32),
        "dora_scale": (magnitude.float() * (base_norm + EPS) / merged_norm).unsqueeze(1),
    }


def _dora_responses(main, written: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The main file's (peft: each row of W + ΔW rescaled to its magnitude) and the copy's (ComfyUI: W + ΔW
    times dora_scale over W's row norm + eps) weight changes of one DoRA layer, applied to random probes."""
    from modules.lora_training.export import VERIFY_PROBES

    layer, magnitude, base, (base_norm, merged_norm) = main
    probes = torch.randn(base.shape[1], VERIFY_PROBES, generator=torch.Generator().manual_seed(base.shape[1]))
    base_out = base @ probes
    change = layer.up.float() @ (layer.down.float() @ probes) * layer.scale
    expected = (base_out + change) * (magnitude.float() / merged_norm).unsqueeze(1) - base_out
    t = {name: value.float() for name, value in written.items()}
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    if down.shape[1] != base.shape[1] or up.shape[0] != base.shape[0] or t["dora_scale"].numel() != base.shape[0]:
        raise UserError("Export check failed: a layer of the webui copy does not have the main file's shape.")
    copied = up @ (down @ probes) * (t["alpha"].item() / down.shape[0])
    got = (base_out + copied) * (t["dora_scale"].reshape(-1, 1) / (base_norm + EPS).unsqueeze(1)) - base_out
    return expected, got


def release_freed_memory() -> None:
    """Hand freed memory back to the system. glibc keeps freed buffers of a few MB in its heap and grows it
    when the next layer's weight has another size: over a full-size model's layers, GBs of resident memory."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator manages this itself
        ctypes.CDLL(None).malloc_trim(0)


# ----- both files, module by module -------------------------------------------------------------
def _dora_modules(path: Path, base_weight: BaseWeight):
    """(diffusers module, copy tensors, what the check needs) of each layer of a DoRA main file."""
    from modules.lora_training.export import PartSource, present_parts, read_lora

    lora = read_lora(path)
    with lora.open() as reader:
        source = PartSource(lora, reader)
        for part in present_parts(source):
            layer, down_key = source.get(part), source.where[part].down_key
            key = down_key.removesuffix(".lora_A.weight") if down_key.endswith(".lora_A.weight") else part
            magnitude = reader.get(f"{key}.lora_magnitude_vector.weight")
            base = base_weight(part).float()
            norms = dora_norms(base, layer)
            yield part, _dora_copy(layer, magnitude, norms), (layer, magnitude, base, norms)
            del base
            release_freed_memory()


def _lycoris_modules(path: Path):
    """(diffusers module, copy tensors, main file's tensors and peft scale) of each layer of a LoKr/LoHa main file."""
    with SafetensorsReader(path) as reader:
        for part, (keys, scale) in lycoris_parts(reader).items():
            tensors = {name: reader.get(key) for name, key in keys.items()}
            if any(value.dim() != 2 for value in tensors.values()):
                raise UserError(f"{part} is a convolution: the webui copy holds linear layers only.")
            rank = next((value.shape[0] for name, value in tensors.items() if name.endswith("_b")), 1)
            yield part, _lycoris_copy(tensors, scale, rank), (tensors, scale)


def _modules(path: Path, network: str, base_weight: BaseWeight | None):
    if network != "dora":
        return _lycoris_modules(path)
    if base_weight is None:
        raise UserError(
            f"{path.name} is a DoRA LoRA: its webui copy needs the base model's weights, so it is written at "
            "the end of training (or when a checkpoint is saved as a LoRA). Generate and diffusers apply the "
            "main file."
        )
    return _dora_modules(path, base_weight)


def network_args(network: str, metadata: dict[str, str], *, file: str = "this file") -> dict[str, str]:
    """``ss_network_args`` as LyCORIS' kohya wrapper (``lycoris.kohya``) records them."""
    if network == "dora":
        return {"algo": "lora", "dora_wd": "True", "wd_on_out": "True"}
    args = {"algo": network}
    if network == "lokr":
        config = next(iter(component_configs(metadata, file=file).values()))
        args["factor"] = str(config.decompose_factor)
    return args


def _copy_metadata(path: Path, metadata: dict[str, str], *, network: str, family_name: str) -> dict[str, str]:
    from modules.lora_training.export import LoraFile, kohya_metadata

    rank = int(metadata.get("lora_studio.rank") or 0)
    alpha = float(metadata.get("lora_studio.alpha") or rank)
    out = kohya_metadata(LoraFile(path, family_name, "diffusers", [], metadata, network), rank=rank, alpha=alpha)
    out["ss_network_module"] = "lycoris.kohya"
    out["ss_network_args"] = json.dumps(network_args(network, metadata, file=Path(path).name))
    return out


def main_network(path: Path) -> tuple[str, str, dict[str, str]]:
    """(network, family, header) of a main file the LyCORIS copy handles: lokr, loha or dora; network is
    "lora" for plain LoRA files."""
    from families import lora_family

    with SafetensorsReader(path) as reader:
        keys, metadata = reader.keys(), reader.metadata
        check_adapter_file({k: info.shape for k, info in reader.tensors.items()}, metadata, file=Path(path).name)
    network = lycoris_network(keys, metadata, file=Path(path).name)
    if network is None:
        network = "dora" if any(key.endswith(".lora_magnitude_vector.weight") for key in keys) else "lora"
    return network, lora_family(keys[:2000], metadata) or "", metadata


def _write(path: Path, tmp: Path, *, network: str, family_name: str, base_weight: BaseWeight | None) -> None:
    kind = family(family_name)
    tensors: dict[str, torch.Tensor] = {}
    for part, copy, _ in _modules(path, network, base_weight):
        name = kind.lycoris_name(part)
        tensors.update({f"{name}.{suffix}": value for suffix, value in copy.items()})
    specs = []
    for key, value in tensors.items():
        dtype = torch.float32 if key.endswith((".alpha", ".dora_scale")) else OUT_DTYPE
        produce = lambda v=value, d=dtype: v.detach().to("cpu", d).contiguous()  # noqa: E731
        specs.append(TensorSpec(key, dtype, tuple(value.shape), produce))
    with SafetensorsReader(path) as reader:
        metadata = _copy_metadata(path, reader.metadata, network=network, family_name=family_name)
    write_safetensors_to(tmp, specs, metadata=metadata)


def _responses(main: tuple[dict[str, torch.Tensor], float], written: dict[str, torch.Tensor]):
    """The main file's and the copy's responses of one LoKr/LoHa layer to the same random probes."""
    from modules.lora_training.export import VERIFY_PROBES

    tensors, scale = main
    width = _in_features(tensors)
    probes = torch.randn(width, VERIFY_PROBES, generator=torch.Generator().manual_seed(width))
    copy = {name: value for name, value in written.items() if name != "alpha"}
    expected = lycoris_response(tensors, probes, scale)
    if _in_features(copy) != width or _out_features(copy) != expected.shape[0]:
        raise UserError("Export check failed: a layer of the webui copy does not have the main file's shape.")
    return expected, lycoris_response(copy, probes, comfy_scale(written))


def _in_features(t: dict[str, torch.Tensor]) -> int:
    if "hada_w1_b" in t:
        return t["hada_w1_b"].shape[1]
    return math.prod(t[f"lokr_w{i}"].shape[1] if f"lokr_w{i}" in t else t[f"lokr_w{i}_b"].shape[1] for i in (1, 2))


def _out_features(t: dict[str, torch.Tensor]) -> int:
    if "hada_w1_a" in t:
        return t["hada_w1_a"].shape[0]
    return math.prod(t[f"lokr_w{i}"].shape[0] if f"lokr_w{i}" in t else t[f"lokr_w{i}_a"].shape[0] for i in (1, 2))


def verify_copy(path: Path, copy: Path, *, network: str, family_name: str, base_weight: BaseWeight | None):
    """Each module's weight change in ``copy`` (as ComfyUI computes it) against the main file's (as peft does)."""
    from modules.lora_training.export import DifferenceTally, Verification

    kind, tally, layers = family(family_name), DifferenceTally(), 0
    with SafetensorsReader(copy) as reader:
        by_module: dict[str, list[str]] = {}
        for key in reader.keys():  # noqa: SIM118 - the reader is no dict
            by_module.setdefault(key.split(".", 1)[0], []).append(key)
        for part, _, expected in _modules(path, network, base_weight):
            name = kind.lycoris_name(part)
            written = {k[len(name) + 1 :]: reader.get(k) for k in by_module.get(name, [])}
            if not written:
                raise UserError(f"Export check failed: {name} is missing from the webui copy.")
            responses = _dora_responses if network == "dora" else _responses
            expected, got = responses(expected, written)
            tally.add(expected, expected=True)
            tally.add(got - expected, expected=False)
            layers += 1
    return Verification(max_difference=tally.worst, largest_change=tally.largest, layers=layers)


def export_lycoris_copy(path: Path, out: Path, *, base_weight: BaseWeight | None = None):
    """Write the LyCORIS-layout webui copy of the LoKr/LoHa/DoRA main file ``path`` at ``out`` (atomically),
    read it back and verify it; returns the :class:`~modules.lora_training.export.Verification`."""
    network, family_name, _ = main_network(path)
    if network == "lora":
        raise UserError(f"{Path(path).name} is a plain LoRA: its webui copy uses the kohya layout.")
    with atomic_path(out) as tmp:
        _write(path, tmp, network=network, family_name=family_name, base_weight=base_weight)
        check = verify_copy(path, tmp, network=network, family_name=family_name, base_weight=base_weight)
        if not check.ok:
            raise UserError(
                f"Export check failed: the webui copy changes weights differently from the main file (max "
                f"difference {check.max_difference:.3g}, {check.relative:.2%} of the largest change). Nothing was written."
            )
    return check


def pipeline_base_weights(pipe) -> BaseWeight:
    """The frozen weight of a diffusers module (``<component>.<module>``) of ``pipe``, under its adapter."""
    from families.clip_names import with_clip_level

    def base_weight(part: str) -> torch.Tensor:
        component, module = part.split(".", 1)
        model = getattr(pipe, component)
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            layer = model.get_submodule(with_clip_level(module))
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if layer.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UserError("The base model is quantized: a DoRA webui copy needs its full weights.")
        return layer.weight.detach().float().cpu()

    return base_weight


# ----- inspection --------------------------------------------------------------------------------
def _stems(keys: list[str]) -> dict[str, dict[str, str]]:
    stems: dict[str, dict[str, str]] = {}
    for key in keys:
        if match := LYCORIS_KEY.search(key):
            stems.setdefault(key[: match.start()], {})[match.group(1)] = key
    return stems


def _group(factor: int | None, rank: int | None, alpha: float | None, *, scale: float) -> str:
    if factor is None:  # LoKr with both Kronecker factors full: no rank to it
        return f"full factors, scale {scale:g}"
    return f"rank {rank}, alpha {'missing' if alpha is None else f'{alpha:g}'}"


def _file_alpha(reader: SafetensorsReader, key: str) -> float:
    """A LyCORIS layer's ``alpha`` tensor: one finite number."""
    import math

    value = reader.get(key)
    if value.numel() != 1 or not math.isfinite(float(value.float().reshape(-1)[0])):
        raise UserError(f"{reader.path.name}: {key} is not one finite number; the file is damaged or not a LoRA.")
    return float(value.float().reshape(-1)[0])


def lycoris_summary(path: Path) -> tuple[str, str, str, list[str], dict[str, str]] | None:
    """(family, network, layout, lines, header) of a LoKr/LoHa file (peft main file or LyCORIS copy);
    None for other files. Reads the header and the alphas only."""
    from families import lora_family

    with SafetensorsReader(path) as reader:
        keys, metadata = reader.keys(), reader.metadata
        check_adapter_file({k: info.shape for k, info in reader.tensors.items()}, metadata, file=Path(path).name)
        stems = _stems(keys)
        if not stems:
            return None
        network = "lokr" if any(name.startswith("lokr") for names in stems.values() for name in names) else "loha"
        peft = lycoris_network(keys, metadata, file=Path(path).name) is not None
        ranks: dict[str, int] = {}
        configs = component_configs(metadata, file=Path(path).name) if peft else {}
        for stem, names in stems.items():
            factor = next((reader.tensors[key].shape[0] for name, key in names.items() if name.endswith("_b")), None)
            if peft:
                config = configs[stem.split(".", 1)[0]]
                group = _group(factor, config.r, float(config.alpha), scale=config.alpha / config.r)
            else:
                alpha_key = f"{stem}.alpha"
                alpha = _file_alpha(reader, alpha_key) if alpha_key in reader.tensors else None
                group = _group(factor, factor, alpha, scale=1.0)
            ranks[group] = ranks.get(group, 0) + 1
    layout = f"{'peft' if peft else 'LyCORIS'} format, {len(stems)} layers"
    lines = [f"  {group}: {count} layers" for group, count in sorted(ranks.items())]
    if peft and network == "lokr":
        lines.append(f"  LoKr factor: {next(iter(configs.values())).decompose_factor}")
    return lora_family(keys[:2000], metadata) or "", network, layout, lines, metadata
