"""The one check of a LoRA file's ``lora_adapter_metadata`` header, shared by Generate, inspect and export.

diffusers packs each component's peft config as ``<component>.<field>`` in one JSON string. A file from
another tool, or a hostile one, can put anything there: a regular expression in ``target_modules`` (peft
matches it against every layer name: one bad pattern hangs the process), a rank of 16384 on a file of
450 KB (peft allocates it before reading a weight), NaN as alpha (every image black). So the header is
parsed once, only the fields listed here are kept, each with its type and range checked, ranks are
compared with the tensor shapes, and what reaches peft is built from the checked values only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.errors import UserError

MAX_RANK = 1024  # the training form's bound
MAX_ALPHA = 4096.0
MAX_PATTERNS = 256  # LoKr/LoHa rank_pattern / alpha_pattern entries: peft tries each against every layer name
MAX_LORA_PATTERNS = 100_000  # a LoRA's patterns never reach peft (its scale is folded in here)
MAX_TARGETS = 4096
MAX_NAME = 300
PLAIN_NAME = re.compile(r"\^?[A-Za-z0-9_.]{1,300}")  # a layer name: no regular-expression syntax
NETWORKS = {"LORA": "lora", "LOKR": "lokr", "LOHA": "loha"}
_BOOLS = ("use_dora", "use_rslora", "decompose_both", "use_effective_conv2d")
# Fields that change which layers are adapted or add trained modules: ignoring them would apply the
# file differently from how it was trained, so a file that sets them is refused.
_UNSUPPORTED = ("modules_to_save", "layers_to_transform", "layer_replication")


@dataclass(frozen=True)
class ComponentConfig:
    """The checked adapter settings of one pipeline component (unet, transformer, text_encoder...)."""

    network: str  # lora, lokr or loha
    r: int
    alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str = ()  # a string: one layer name, matched in full (peft's rule)
    exclude_modules: tuple[str, ...] | str = ()
    use_rslora: bool = False
    use_dora: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    use_effective_conv2d: bool = False

    _rank_index: dict = field(init=False, repr=False, compare=False)
    _alpha_index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rank_index", _pattern_index(self.rank_pattern))
        object.__setattr__(self, "_alpha_index", _pattern_index(self.alpha_pattern))

    def rank_of(self, module: str) -> int:
        return _pattern_value(self._rank_index, module, self.r)

    def alpha_of(self, module: str) -> float:
        return _pattern_value(self._alpha_index, module, self.alpha)

    def scale_of(self, module: str) -> float:
        rank = self.rank_of(module)
        return self.alpha_of(module) / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern_index(patterns: Mapping) -> dict[str, tuple[int, object]]:
    """{key: (its place in the file, value)}: the first of equal keys wins, as in peft."""
    index: dict[str, tuple[int, object]] = {}
    for order, (name, value) in enumerate(patterns.items()):
        index.setdefault(name, (order, value))
    return index


def _pattern_value(index: Mapping, module: str, default):
    """peft's pattern lookup for plain names: the first key (in file order) that is the layer's name or a
    dotted suffix of it (a ``^`` key: the whole name only). Looked up by suffix, so thousands of
    per-layer entries cost no more than a few."""
    parts = module.split(".")
    candidates = [index.get("^" + module)] + [index.get(".".join(parts[i:])) for i in range(len(parts))]
    found = [hit for hit in candidates if hit is not None]
    return min(found, key=lambda hit: hit[0])[1] if found else default


def _refuse(file: str, what: str) -> UserError:
    return UserError(
        f"{file} has adapter settings (lora_adapter_metadata) this app cannot use: {what}. "
        "Save it again with the tool that made it, or remove it from the LoRA folder."
    )


def parse_packed(metadata: Mapping[str, str], *, file: str) -> dict[str, dict]:
    """{component: {field: value}} from the ``lora_adapter_metadata`` header; {} when there is none."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _refuse(file, "it is not valid JSON") from exc
    if not isinstance(packed, dict):
        raise _refuse(file, f"it is a JSON {type(packed).__name__}, not an object")
    components: dict[str, dict] = {}
    for key, value in packed.items():
        component, dot, name = key.partition(".")
        if not dot or not PLAIN_NAME.fullmatch(component) or component.startswith("^"):
            raise _refuse(file, f"the key {key[:80]!r} is not <component>.<setting>")
        components.setdefault(component, {})[name] = value
    return components


def _whole(file: str, label: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _refuse(file, f"{label} is {str(value)[:40]!r}, not a whole number from {low} to {high}")
    return value


def _real(file: str, label: str, value) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0 <= value <= MAX_ALPHA:
        raise _refuse(file, f"{label} is {str(value)[:40]!r}, not a number from 0 to {MAX_ALPHA:g}")
    return float(value)


def _names(file: str, label: str, value, *, required: bool) -> tuple[str, ...] | str:
    if value is None and not required:
        return ()
    if isinstance(value, str):
        # peft full-matches a string against each layer name: a plain name (letters, digits, _ and .)
        # matches in linear time and names one layer; anything else is a regular expression, refused.
        if value.startswith("^") or not PLAIN_NAME.fullmatch(value):
            raise _refuse(file, f"{label} is a regular expression; only layer names are accepted")
        return value
    if not isinstance(value, list) or not value and required or len(value) > MAX_TARGETS:
        raise _refuse(file, f"{label} is not a list of 1 to {MAX_TARGETS} layer names")
    for name in value:
        if not isinstance(name, str) or name.startswith("^") or not PLAIN_NAME.fullmatch(name):
            raise _refuse(file, f"{label} holds {str(name)[:60]!r}, which is not a plain layer name")
    return tuple(value)


def _patterns(file: str, label: str, value, check, *, most: int) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > most:
        raise _refuse(file, f"{label} is not a mapping of at most {most} layer names")
    for key in value:
        if not PLAIN_NAME.fullmatch(key):
            raise _refuse(file, f"{label} names {key[:60]!r}, which is not a plain layer name")
    return {key: check(f"{label}[{key[:40]!r}]", item) for key, item in value.items()}


def check_component(fields: Mapping, *, file: str, component: str) -> ComponentConfig:
    """The checked settings of one component; UserError naming the first field that is wrong."""
    network = (
        NETWORKS.get(fields.get("peft_type", "LORA")) if isinstance(fields.get("peft_type", "LORA"), str) else None
    )
    if network is None:
        raise _refuse(file, f"{component}.peft_type {str(fields.get('peft_type'))[:40]!r} is not LORA, LOKR or LOHA")
    for name in _UNSUPPORTED:
        if fields.get(name) not in (None, [], {}):
            raise _refuse(file, f"{component}.{name} is set, which Generate does not support")
    for name in _BOOLS:
        if not isinstance(fields.get(name, False), bool):
            raise _refuse(file, f"{component}.{name} is {str(fields.get(name))[:40]!r}, not true or false")
    label = f"{component}.{'lora_alpha' if network == 'lora' else 'alpha'}"
    rank = _whole(file, f"{component}.r", fields.get("r"), 1, MAX_RANK)
    factor = fields.get("decompose_factor", -1)
    most = MAX_LORA_PATTERNS if network == "lora" else MAX_PATTERNS
    return ComponentConfig(
        network=network,
        r=rank,
        alpha=_real(file, label, fields.get(label.split(".", 1)[1], rank)),
        rank_pattern=_patterns(
            file, f"{component}.rank_pattern", fields.get("rank_pattern"), _rank_check(file), most=most
        ),
        alpha_pattern=_patterns(
            file, f"{component}.alpha_pattern", fields.get("alpha_pattern"), _alpha_check(file), most=most
        ),
        **_layers(fields, file=file, component=component, network=network),
        decompose_factor=-1 if factor == -1 else _whole(file, f"{component}.decompose_factor", factor, 1, MAX_RANK),
        **{name: fields.get(name, False) for name in _BOOLS},
    )


def _layers(fields: Mapping, *, file: str, component: str, network: str) -> dict:
    """LoKr/LoHa: the layers peft adapts, plain names only. LoRA files are loaded from their tensor names,
    so these fields of theirs are never used (nor read)."""
    if network == "lora":
        return {}
    return {
        "target_modules": _names(file, f"{component}.target_modules", fields.get("target_modules"), required=True),
        "exclude_modules": _names(file, f"{component}.exclude_modules", fields.get("exclude_modules"), required=False),
    }


def _rank_check(file: str):
    return lambda label, value: _whole(file, label, value, 1, MAX_RANK)


def _alpha_check(file: str):
    return lambda label, value: _real(file, label, value)


def adapter_configs(metadata: Mapping[str, str], *, file: str) -> dict[str, ComponentConfig]:
    """{component: checked settings} of a LoRA file's header; {} when it has no adapter metadata."""
    return {
        component: check_component(fields, file=file, component=component)
        for component, fields in parse_packed(metadata, file=file).items()
    }


TENSOR_NAME = re.compile(r"[A-Za-z0-9_.]{1,400}")
_RANK_TENSORS = (".hada_w1_b", ".lokr_w1_b", ".lokr_w2_b")
# diffusers' spellings of a LoRA layer's down / up weights (peft's, its older attention-processor
# ``<attn>.processor.to_q_lora.down.weight``, and ``.lora.down`` / ``.lora_linear_layer.down``).
_LORA_ROLES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
)


def lora_layer(key: str) -> tuple[str, str] | None:
    """(layer name as peft names it inside its component, "down" or "up") of a diffusers-layout LoRA
    tensor ``<component>.<...>``; None for other tensors."""
    rest = key.partition(".")[2]
    for suffix, role in _LORA_ROLES:
        if rest.endswith(suffix):
            stem = rest.removesuffix(suffix)
            if suffix.startswith("_lora") and ".processor." in stem:  # <attn>.processor.to_out -> <attn>.to_out.0
                head, _, projection = stem.rpartition(".processor.")
                stem = f"{head}.{projection}" + (".0" if projection == "to_out" else "")
            return stem, role
    return None


_KINDS = {".lora_": "lora", ".hada_": "loha", ".lokr_": "lokr"}


def _kind(key: str) -> str | None:
    return next((kind for mark, kind in _KINDS.items() if mark in key), None)


def _tensor_rank(key: str, shape: tuple[int, ...]) -> tuple[str, int] | None:
    """(layer inside its component, rank) from a tensor whose first dimension is the rank; else None."""
    layer = lora_layer(key)
    if layer is not None and layer[1] == "down" and shape:
        return layer[0], shape[0]
    for suffix in _RANK_TENSORS:
        if key.endswith(suffix) and shape:
            return key.removesuffix(suffix).partition(".")[2], shape[0]
    return None


def check_adapter_file(shapes: Mapping[str, tuple], metadata: Mapping[str, str], *, file: str):
    """:func:`adapter_configs`, plus the checks against the tensors: plain tensor names, and each layer's
    rank in the header equal to the rank of its weights (peft allocates the header's rank)."""
    for key in shapes:
        if not TENSOR_NAME.fullmatch(key):
            raise UserError(
                f"{file} holds a tensor named {key[:80]!r}, which no LoRA tool writes. "
                "Remove the file from the LoRA folder."
            )
    configs = adapter_configs(metadata, file=file)
    for key, shape in shapes.items():
        found = _tensor_rank(key, tuple(shape))
        component, _, module = key.partition(".")
        config = configs.get(component)
        kind = _kind(key)
        if config is not None and kind is not None and kind != config.network:
            raise _refuse(
                file, f"{component}.peft_type says {config.network.upper()} but the weights are {kind.upper()}"
            )
        if found is None or config is None:
            continue
        expected = config.rank_of(found[0])
        if found[1] != expected:
            raise _refuse(file, f"{component}.{found[0][:120]} has rank {found[1]} but the header says {expected}")
    return configs
