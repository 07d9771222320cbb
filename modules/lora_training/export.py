"""LoRA files that load everywhere: kohya/webui export, diffusers export, inspection, verification.

Every LoRA is reduced to the same picture: per diffusers module, ``down`` (A), ``up`` (B)
and the scale ``alpha / rank`` (:mod:`modules.lora_training.lora_layouts` names them).
Export writes that picture in another layout (the family plans the kohya/webui copy's
modules and names); verification reads the written file back and compares, layer by layer and
rows in blocks, each module's weight change ``up @ down * alpha / rank`` with the source's.

Memory stays bounded whatever the LoRA's size: tensors are read one at a time
(:mod:`model_formats.safetensors_stream`), the output is written one tensor at a time, and no
more than one block of a weight change is held at once. A family whose kohya layout fuses
several diffusers modules into one stacks their downs and places their ups block-diagonally
(:class:`OutModule` with several parts), so readers apply exactly the diffusers LoRA's change.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from core.adapter_metadata import check_adapter_file
from core.atomic import atomic_path
from core.errors import UserError
from families import display_name, family
from model_formats.safetensors_stream import SafetensorsReader, TensorSpec, write_safetensors_to
from modules.lora_training.lora_layouts import FileModule, discover_modules

FORMATS = ("kohya", "diffusers")
VERIFY_TOLERANCE = 1e-3  # relative to the largest response of a change; fp16 storage rounds at ~1e-3
VERIFY_PROBES = 16  # random vectors each weight change is applied to when verifying an export
OUT_DTYPE = torch.float16
NETWORK_NAMES = {
    "lora": "LoRA",
    "dora": "DoRA (weight-decomposed LoRA)",
    "lokr": "LoKr (LyCORIS Kronecker product)",
    "loha": "LoHa (LyCORIS Hadamard product)",
}
DORA_KEY = re.compile(r"\.(lora_magnitude_vector|dora_scale)(\.weight)?$")  # DoRA's per-row magnitudes


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


@dataclass
class LoraFile:
    path: Path
    family: str  # a registered family name (:data:`families.FAMILY_NAMES`)
    format: str  # diffusers | kohya | comfyui
    modules: list[FileModule]
    metadata: dict[str, str] = field(default_factory=dict)
    network: str = "lora"  # lora | dora (the file holds DoRA magnitude vectors)

    def parts(self) -> list[str]:
        """The diffusers modules this LoRA changes, in file order."""
        return [part for module in self.modules for part in module.parts]

    def open(self) -> SafetensorsReader:
        return SafetensorsReader(self.path)


# ----- reading -------------------------------------------------------------------------
def _read_alpha(reader: SafetensorsReader, module: FileModule, configs: dict) -> float | None:
    if module.alpha_key is not None:
        value = reader.get(module.alpha_key)
        if value.numel() != 1 or not math.isfinite(float(value.float().reshape(-1)[0])):
            raise UserError(f"{reader.path.name}: {module.alpha_key} is not a single number")
        return float(value.float().reshape(-1)[0])
    config = configs.get(module.parts[0].split(".")[0]) if module.parts else None
    return config.alpha if config is not None else None


def read_lora(path: Path) -> LoraFile:
    """Any LoRA layout we know (ours, diffusers/PEFT, kohya/webui, OneTrainer, ComfyUI): header and alphas only."""
    path = Path(path)
    with SafetensorsReader(path) as reader:
        shapes = {name: info.shape for name, info in reader.tensors.items()}
        if not shapes:
            raise UserError(f"{path.name} holds no tensors.")
        family_name, layout, modules = discover_modules(shapes, reader.metadata)
        if not modules:
            raise UserError(f"corrupt or not a LoRA file: {path.name} (no LoRA down/up weight pairs)")
        configs = check_adapter_file(shapes, reader.metadata, file=path.name)  # parsed once, checked
        modules = [replace(module, alpha=_read_alpha(reader, module, configs)) for module in modules]
        network = "dora" if any(DORA_KEY.search(name) for name in shapes) else "lora"
        return LoraFile(path, family_name, layout, modules, dict(reader.metadata), network)


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def load_module(reader: SafetensorsReader, module: FileModule) -> LoraLayer:
    """The module's tensors as written, rows in diffusers order (BFL's swapped modulation halves undone)."""
    up = reader.get(module.up_key)
    if module.kind == "swapped":
        up = _swap_halves(up)
    return LoraLayer(down=reader.get(module.down_key), up=up, alpha=module.alpha)


def _is_block_diagonal(up: torch.Tensor, rows: tuple[int, ...], rank: int) -> bool:
    count = len(rows)
    if rank % count:
        return False
    width, start = rank // count, 0
    for index, size in enumerate(rows):
        block = up[start : start + size]
        if block[:, : index * width].any() or block[:, (index + 1) * width :].any():
            return False
        start += size
    return True


def split_parts(layer: LoraLayer, module: FileModule) -> dict[str, LoraLayer]:
    """Per diffusers module, the LoRA a (possibly fused) module holds; all-zero parts are left out."""
    if len(module.parts) == 1:
        return {module.parts[0]: layer}
    rows = module.part_rows()
    up = layer.up.flatten(1)
    diagonal = _is_block_diagonal(up, rows, layer.rank)
    width = layer.rank // len(rows)
    alpha = layer.alpha if layer.alpha is not None else float(layer.rank)
    out, start = {}, 0
    for index, (part, size) in enumerate(zip(module.parts, rows, strict=True)):
        part_up = up[start : start + size]
        start += size
        if not part_up.any():
            continue
        if diagonal:
            columns = slice(index * width, (index + 1) * width)
            # Same alpha/rank as the fused module, at the part's own rank.
            out[part] = LoraLayer(layer.down[columns], part_up[:, columns], alpha * width / layer.rank)
        else:
            out[part] = LoraLayer(layer.down, part_up, alpha)
    return out


class PartSource:
    """The source LoRA's layers by diffusers module, read on demand (the last module read is kept)."""

    def __init__(self, lora: LoraFile, reader: SafetensorsReader) -> None:
        self.lora, self.reader = lora, reader
        self.where = {part: module for module in lora.modules for part in module.parts}
        self._last: tuple[FileModule | None, dict[str, LoraLayer]] = (None, {})

    def get(self, part: str) -> LoraLayer | None:
        module = self.where.get(part)
        if module is None:
            return None
        if self._last[0] is not module:
            self._last = (module, split_parts(load_module(self.reader, module), module))
        return self._last[1].get(part)

    def shape(self, part: str) -> tuple[int, int, int] | None:
        """(rank, output rows, input features) of a part, from the header when the module is not fused."""
        module = self.where.get(part)
        if module is None:
            return None
        if len(module.parts) == 1:
            return module.rank, module.out_features, module.in_features
        layer = self.get(part)
        return None if layer is None else (layer.rank, layer.up.shape[0], layer.down.flatten(1).shape[1])


# ----- planning the output -------------------------------------------------------------
@dataclass(frozen=True)
class OutModule:
    """One module of the file to write, built from source parts stacked along its rows."""

    name: str
    parts: tuple[str | None, ...]  # None: a part the source LoRA does not change (zero rows)
    rows: tuple[int, ...]
    ranks: tuple[int, ...]
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    swapped: bool = False  # BFL's final modulation: row halves exchanged


def single_module(name: str, part: str, source: PartSource, *, swapped: bool = False) -> OutModule:
    module = source.where[part]
    if len(module.parts) == 1:
        down_shape, up_shape = module.down_shape, module.up_shape
    else:
        rank, rows, width = source.shape(part)
        down_shape, up_shape = (rank, width), (rows, rank)
    return OutModule(name, (part,), (up_shape[0],), (down_shape[0],), down_shape, up_shape, swapped)


def present_parts(source: PartSource) -> list[str]:
    return [part for part in source.lora.parts() if source.shape(part) is not None]


# ----- building and writing ------------------------------------------------------------
def build_layer(out: OutModule, source: PartSource) -> LoraLayer:
    """The output module's down, up and alpha (never None: kohya readers want one)."""
    layers = [source.get(part) if part else None for part in out.parts]
    if len(layers) == 1:
        layer = layers[0]
        up = _swap_halves(layer.up) if out.swapped else layer.up
        alpha = layer.alpha if layer.alpha is not None else float(layer.rank)
        return LoraLayer(layer.down.reshape(out.down_shape), up.reshape(out.up_shape), alpha)
    scale = next(layer.scale for layer in layers if layer is not None)
    down = torch.zeros(out.down_shape)
    up = torch.zeros(out.up_shape)
    column = row = 0
    for layer, rows, rank in zip(layers, out.rows, out.ranks, strict=True):
        if layer is not None:
            down[column : column + rank] = layer.down.flatten(1)
            # A part trained at another alpha/rank keeps its change: the ratio goes into its up block.
            up[row : row + rows, column : column + rank] = layer.up.flatten(1).float() * (layer.scale / scale)
        column, row = column + rank, row + rows
    return LoraLayer(down, up, scale * sum(out.ranks))


class _Builder:
    """Builds each output module once, for the tensors written one after the other."""

    def __init__(self, source: PartSource) -> None:
        self.source = source
        self._last: tuple[OutModule | None, LoraLayer | None] = (None, None)

    def layer(self, out: OutModule) -> LoraLayer:
        if self._last[0] is not out:
            self._last = (out, build_layer(out, self.source))
        return self._last[1]


def kohya_specs(plan: list[OutModule], source: PartSource) -> list[TensorSpec]:
    builder = _Builder(source)
    specs = []
    for out in plan:
        specs += [
            TensorSpec(f"{out.name}.alpha", torch.float32, (), lambda o=out: torch.tensor(builder.layer(o).alpha)),
            TensorSpec(
                f"{out.name}.lora_down.weight",
                OUT_DTYPE,
                out.down_shape,
                lambda o=out: builder.layer(o).down.to(OUT_DTYPE),
            ),
            TensorSpec(
                f"{out.name}.lora_up.weight", OUT_DTYPE, out.up_shape, lambda o=out: builder.layer(o).up.to(OUT_DTYPE)
            ),
        ]
    return specs


def diffusers_specs(source: PartSource) -> list[TensorSpec]:
    """Diffusers/PEFT keys; each layer's scale is folded into ``up`` so no alpha can be lost."""
    builder = _Builder(source)
    specs = []
    for part in present_parts(source):
        out = single_module(part, part, source)
        specs += [
            TensorSpec(
                f"{part}.lora_A.weight", OUT_DTYPE, out.down_shape, lambda o=out: builder.layer(o).down.to(OUT_DTYPE)
            ),
            TensorSpec(
                f"{part}.lora_B.weight",
                OUT_DTYPE,
                out.up_shape,
                lambda o=out: (builder.layer(o).up.float() * builder.layer(o).scale).to(OUT_DTYPE),
            ),
        ]
    return specs


def _tag_frequency(metadata: dict) -> str:
    return metadata.get("lora_studio.tag_frequency") or json.dumps({})


def _network_dim_alpha(lora: LoraFile, source: PartSource) -> tuple[int, float]:
    """The rank and alpha the LoRA was trained with (sd-scripts' ``network_dim`` / ``network_alpha``)."""
    meta = lora.metadata
    if meta.get("lora_studio.rank") and meta.get("lora_studio.alpha"):
        return int(meta["lora_studio.rank"]), float(meta["lora_studio.alpha"])
    first = source.get(present_parts(source)[0])
    return first.rank, first.alpha if first.alpha is not None else float(first.rank)


def kohya_metadata(lora: LoraFile, *, rank: int, alpha: float) -> dict[str, str]:
    meta = lora.metadata
    resolution = meta.get("lora_studio.resolution") or "1024"
    title = meta.get("modelspec.title") or lora.path.stem
    trigger = meta.get("lora_studio.trigger_word", meta.get("modelspec.trigger_phrase", ""))
    kind = family(lora.family)
    out = {
        **kind.kohya_identity(),
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_tag_frequency": _tag_frequency(meta),
        "ss_sd_model_name": meta.get("lora_studio.base_model", ""),
        "ss_steps": meta.get("lora_studio.steps", ""),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        **kind.modelspec_identity(),
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger,
        "modelspec.date": meta.get("modelspec.date") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": kind.modelspec_prediction_type(meta),
        **kind.kohya_extra_metadata(meta),
    }
    out.update({k: v for k, v in meta.items() if k.startswith("lora_studio.")})
    return out


def _diffusers_metadata(lora: LoraFile) -> dict[str, str]:
    metadata = {k: v for k, v in lora.metadata.items() if not k.startswith("ss_")}
    metadata.pop("lora_adapter_metadata", None)
    return metadata


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


@dataclass
class DifferenceTally:
    """The largest difference between two weight changes seen so far, and the largest change (its scale)."""

    worst: float = 0.0
    largest: float = 0.0

    def add(self, block: torch.Tensor, *, expected: bool) -> None:
        low, high = torch.aminmax(block)
        peak = max(-low.item(), high.item())
        if expected:
            self.largest = max(self.largest, peak)
        else:
            self.worst = max(self.worst, peak)


def _check_shapes(layer: LoraLayer, offset: int, rows: int, ref: LoraLayer | None, name: str) -> None:
    width = layer.down.flatten(1).shape[1]
    fits = offset + rows <= layer.up.shape[0]
    if ref is not None:
        fits = fits and ref.up.shape[0] == rows and ref.down.flatten(1).shape[1] == width
    if not fits:
        raise UserError(f"Export check failed: {name} does not have the source layer's shape.")


def compare_rows(layer: LoraLayer, offset: int, rows: int, ref: LoraLayer | None, tally: DifferenceTally) -> None:
    """Compare rows ``offset:offset+rows`` of ``layer``'s weight change with ``ref``'s (zeros when None).

    Both changes are applied to the same random probe vectors (Freivalds' check): two different
    matrices give different responses with probability 1, and the cost is rank x (in + out) per
    probe instead of in x out x rank, so a LoRA of a 12B-parameter model verifies in seconds."""
    down = layer.down.flatten(1).float()
    generator = torch.Generator().manual_seed(down.shape[1])
    probes = torch.randn(down.shape[1], VERIFY_PROBES, generator=generator)
    got = (layer.up.flatten(1)[offset : offset + rows].float() * layer.scale) @ (down @ probes)
    if ref is not None:
        expected = (ref.up.flatten(1).float() * ref.scale) @ (ref.down.flatten(1).float() @ probes)
        tally.add(expected, expected=True)
        got -= expected
    tally.add(got, expected=False)


def compare(source: LoraFile, exported: LoraFile) -> Verification:
    """Each exported module's weight change against the source's, module by module, in the exported
    layout (a fused module against its parts' changes stacked along the rows, zeros for absent parts)."""
    tally, seen = DifferenceTally(), set()
    with source.open() as source_reader, exported.open() as out_reader:
        parts = PartSource(source, source_reader)
        for module in exported.modules:
            if not module.parts:
                raise UserError(f"Export check failed: {module.name} is not a layer the reader knows.")
            layer = load_module(out_reader, module)
            offset = 0
            for part, rows in zip(module.parts, module.part_rows(), strict=True):
                ref = parts.get(part)
                _check_shapes(layer, offset, rows, ref, module.name)
                compare_rows(layer, offset, rows, ref, tally)
                if ref is not None:
                    seen.add(part)
                offset += rows
        missing = [part for part in present_parts(parts) if part not in seen]
    if missing:
        raise UserError(f"Export check failed: layers missing after reloading ({missing[:3]}).")
    return Verification(max_difference=tally.worst, largest_change=tally.largest, layers=len(seen))


# ----- export --------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    verification: Verification


def default_export_path(source: Path, fmt: str) -> Path:
    source = Path(source)
    return source.parent / ("webui" if fmt == "kohya" else "diffusers") / source.name


def _write_export(source: LoraFile, tmp: Path, fmt: str) -> None:
    with source.open() as reader:
        parts = PartSource(source, reader)
        if fmt == "diffusers":
            specs, metadata = diffusers_specs(parts), _diffusers_metadata(source)
        else:
            plan = family(source.family).kohya_plan(parts)
            rank, alpha = _network_dim_alpha(source, parts)
            specs, metadata = kohya_specs(plan, parts), kohya_metadata(source, rank=rank, alpha=alpha)
        write_safetensors_to(tmp, specs, metadata=metadata)


def _export_lycoris(source_path: Path, *, fmt: str, out: Path | None, base_weight) -> ExportResult:
    from modules.lora_training.lycoris_copy import export_lycoris_copy, main_network

    if fmt != "kohya":
        raise UserError(
            f"{source_path.name} is a {NETWORK_NAMES[main_network(source_path)[0]]}: its main file is already "
            "the diffusers/peft file; export its webui (kohya) copy instead."
        )
    out = Path(out) if out else default_export_path(source_path, fmt)
    if out.resolve() == source_path.resolve():
        raise UserError("The export would overwrite its source; choose another --out.")
    return ExportResult(
        path=out, format=fmt, verification=export_lycoris_copy(source_path, out, base_weight=base_weight)
    )


def export_lora(source_path: Path, *, fmt: str, out: Path | None = None, base_weight=None) -> ExportResult:
    """Write ``source_path`` in ``fmt`` (atomically), read it back, verify the weight changes match.
    LoKr, LoHa and DoRA files get their webui copy in the LyCORIS layout (:mod:`.lycoris_copy`); a DoRA's
    needs ``base_weight(part)``, the base model's weight of each layer."""
    from modules.lora_training.lycoris_copy import main_network

    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if main_network(Path(source_path))[0] != "lora":
        return _export_lycoris(Path(source_path), fmt=fmt, out=out, base_weight=base_weight)
    source = read_lora(source_path)
    if source.network == "dora":
        raise UserError(
            f"{Path(source_path).name} is a DoRA LoRA in the kohya layout: this app cannot write or verify its "
            f"{fmt} copy. Use the file as it is."
        )
    out = Path(out) if out else default_export_path(source_path, fmt)
    if out.resolve() == Path(source_path).resolve():
        raise UserError("The export would overwrite its source; choose another --out.")
    with atomic_path(out) as tmp:
        _write_export(source, tmp, fmt)
        check = compare(source, read_lora(tmp))
        if not check.ok:
            raise UserError(
                f"Export check failed: the exported LoRA changes weights differently from the source "
                f"(max difference {check.max_difference:.3g}, {check.relative:.2%} of the largest change). "
                "Nothing was written."
            )
    return ExportResult(path=out, format=fmt, verification=check)


# ----- inspection ----------------------------------------------------------------------
def _group_label(module: FileModule) -> str:
    if module.kind != "fused":
        return ""
    return " (fused q/k/v/MLP)" if len(module.parts) == 4 else " (fused q/k/v)"


def alpha_groups(lora: LoraFile) -> dict[str, int]:
    """Layers per (rank, alpha as written in the file), fused modules apart."""
    groups: dict[tuple, int] = {}
    for module in lora.modules:
        key = (module.rank, module.alpha, _group_label(module))
        groups[key] = groups.get(key, 0) + 1
    lines: dict[str, str] = {}
    for (rank, alpha, label), count in sorted(groups.items(), key=str):
        written = "missing" if alpha is None else f"{alpha:g}"
        ratio = "" if alpha is None else f", alpha/rank {alpha / rank:g}"
        key = f"rank {rank}, alpha {written}"
        lines[key] = "; ".join(filter(None, [lines.get(key), f"{count} layers{label}{ratio}"]))
    return lines


def _trigger_words(meta: dict) -> str:
    trigger = meta.get("lora_studio.trigger_word") or meta.get("modelspec.trigger_phrase")
    if trigger or not meta.get("ss_tag_frequency"):
        return trigger or ""
    try:
        counts: dict[str, int] = {}
        for dataset in json.loads(meta["ss_tag_frequency"]).values():
            for tag, n in dataset.items():
                counts[tag] = counts.get(tag, 0) + n
    except (ValueError, AttributeError):
        return ""
    return ", ".join(t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:3])


def _settings_lines(meta: dict) -> list[str]:
    lines, shown = [], set()
    for key, label in (
        ("lora_studio.base_model", "base model"),
        ("ss_sd_model_name", "base model"),
        ("lora_studio.steps", "steps"),
        ("ss_steps", "steps"),
        ("lora_studio.resolution", "resolution"),
        ("ss_resolution", "resolution"),
        ("ss_network_dim", "network dim (sd-scripts)"),
        ("ss_network_alpha", "network alpha (sd-scripts)"),
        ("lora_studio.weights", "weights (trained or EMA)"),
        ("lora_studio.ema", "EMA"),
        ("lora_studio.masked_loss", "masked loss"),
        ("lora_studio.regularization", "regularization"),
        ("ss_network_module", "network module (sd-scripts)"),
        ("ss_network_args", "network args (sd-scripts)"),
    ):
        if meta.get(key) and label not in shown:
            shown.add(label)
            lines.append(f"  {label}: {meta[key]}")
    return lines


def inspect_lora(path: Path) -> str:
    """Family, layout, rank and the alphas written in the file, per group of layers (header and alphas only)."""
    from modules.lora_training.lycoris_copy import lycoris_summary

    summary = lycoris_summary(Path(path))
    if summary is not None:
        family_name, network, layout, lines, meta = summary
        head = f"{Path(path).name}: {display_name(family_name)} {NETWORK_NAMES[network]}, {layout}"
        return "\n".join(
            [head, *lines, f"  trigger words: {_trigger_words(meta) or '(none recorded)'}"] + _settings_lines(meta)
        )
    lora = read_lora(path)
    meta = lora.metadata
    kind = NETWORK_NAMES[lora.network]
    lines = [f"{Path(path).name}: {display_name(lora.family)} {kind}, {lora.format} format, {len(lora.modules)} layers"]
    lines += [f"  {pair}: {counts}" for pair, counts in alpha_groups(lora).items()]
    if any(m.kind == "fused" for m in lora.modules):
        lines.append("  fused modules hold q, k, v (and the MLP input) stacked: rank and alpha scale together")
    targets = sorted({re.sub(r"^.*?\.(?=[a-z_]+(\.\d+)?$)", "", p.split(".", 1)[1]) for p in lora.parts()})
    lines.append(f"  target modules: {', '.join(targets) or '(none known)'}")
    unknown = [m.name for m in lora.modules if not m.parts]
    if unknown:
        lines.append(f"  {len(unknown)} layers with names this app cannot map, e.g. {unknown[0]}")
    lines.append(f"  trigger words: {_trigger_words(meta) or '(none recorded)'}")
    lines += _settings_lines(meta)
    if any(module.alpha is None for module in lora.modules):
        lines.append(
            "  WARNING: no alpha recorded for some layers; loaders will assume alpha = rank (full strength), "
            "which may not be what it was trained with."
        )
    first = [f"    {m.name}: rank {m.rank}, alpha {m.alpha}" for m in lora.modules[:12]]
    return "\n".join([*lines, "  first layers:", *first])
