"""LoKr and LoHa files in the LyCORIS (webui) key layout, turned into peft's layout for one pipeline.

Other tools (kohya sd-scripts with LyCORIS, civitai downloads) name each layer as the webui does
(``<webui module>.lokr_w1``, ``.hada_w1_a``, ``.alpha``). The names are placed
by the inverse of the family's own webui naming, built over the pipeline's actual Linear/Conv layers;
each layer's rank, alpha and (LoKr) Kronecker factorisation become peft settings chosen so that peft
builds exactly the file's tensors and scales them as ComfyUI and LyCORIS do:

- LoHa: alpha over the rank of ``hada_w1_b``; no alpha: scale 1.
- LoKr: alpha over the rank of the decomposed factor (``w2``'s when both are); scale 1 when both factors
  are full (alpha ignored) or when there is no alpha.

Nothing reaches peft but plain layer names and checked numbers; the caller adds the adapter through
:func:`core.adapter_files._add_lycoris` and :func:`check_applied` then confirms each layer's rank and scale.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

from core.adapter_metadata import MAX_ALPHA, MAX_RANK, ComponentConfig
from core.errors import UserError

LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_TUCKER = ("lokr_t2", "hada_t1", "hada_t2")
_PLAIN_LORA = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
MAX_FACTOR_TRIES = 16
MAX_FACTOR = 65_536


@dataclass(frozen=True)
class LayerPlan:
    """One file layer as peft will hold it."""

    part: str  # <component>.<module>, the pipeline's own name
    network: str  # lokr or loha
    r: int
    alpha: float  # peft's alpha: peft scales by alpha / r
    tensors: dict  # peft parameter name -> tensor


def _refuse(file: str, what: str) -> UserError:
    return UserError(
        f"{file} is a LoKr/LoHa in the LyCORIS (webui) layout that Generate cannot apply: {what}. "
        "Use ComfyUI or Forge for this file, or remove it from the LoRA folder."
    )


def _suffix_problem(suffix: str) -> str | None:
    if suffix in LOKR_PARAMS or suffix in LOHA_PARAMS or suffix == "alpha":
        return None
    if suffix in _PLAIN_LORA:
        return "it mixes plain LoRA layers (lora_down/lora_up) with LoKr/LoHa layers"
    if suffix in _TUCKER:
        return f"it holds Tucker-decomposed convolutions ({suffix}), which peft stores differently"
    if suffix == "dora_scale":
        return "it holds weight-decomposed (DoRA) LoKr/LoHa layers"
    return f"it holds a tensor {suffix[:60]!r} no LoKr/LoHa reader knows"


def group_layers(state: dict, *, file: str) -> dict[str, dict]:
    """{webui module: {parameter: tensor}} of a LyCORIS-layout state dict; UserError for anything else in it."""
    layers: dict[str, dict] = {}
    for key, tensor in state.items():
        stem, dot, suffix = key.partition(".")
        problem = "a tensor name without a module" if not dot else _suffix_problem(suffix)
        if problem is not None:
            raise _refuse(file, f"{problem} ({key[:120]})")
        layers.setdefault(stem, {})[suffix] = tensor
    return layers


def layer_alpha(tensors: dict, *, file: str, name: str) -> float | None:
    """A layer's ``alpha`` tensor as one finite number from 0 to MAX_ALPHA; None when the layer has none."""
    value = tensors.pop("alpha", None)
    if value is None:
        return None
    number = float(value.float().reshape(-1)[0]) if value.numel() == 1 else math.nan
    if not math.isfinite(number) or not 0 <= number <= MAX_ALPHA:
        raise _refuse(file, f"{name}.alpha is not one number from 0 to {MAX_ALPHA:g}")
    return number


def _dims(module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear or Conv2d layer, as peft reads them."""
    import torch

    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
    return module.out_features, module.in_features, ()


def lokr_plan(part: str, t: dict, alpha: float | None, *, file: str, name: str) -> LayerPlan:
    """A LoKr layer's peft rank and alpha: the decomposed factor's rank (both decomposed: the same rank),
    scale alpha / rank; both factors full: any rank that keeps them full in peft, at scale 1."""
    w1_split, w2_split = "lokr_w1_a" in t, "lokr_w2_a" in t
    need = {"lokr_w1_a", "lokr_w1_b"} if w1_split else {"lokr_w1"}
    need |= {"lokr_w2_a", "lokr_w2_b"} if w2_split else {"lokr_w2"}
    if set(t) != need:
        raise _refuse(file, f"{name} has the Kronecker factors {sorted(t)}, not one whole set")
    if any(value.dim() != (4 if key == "lokr_w2" and value.dim() == 4 else 2) for key, value in t.items()):
        raise _refuse(file, f"{name} has factors of shapes {[tuple(v.shape) for v in t.values()]}, not matrices")
    ranks = {t[f"lokr_w{i}_b"].shape[0] for i, split in ((1, w1_split), (2, w2_split)) if split}
    if len(ranks) > 1:
        raise _refuse(file, f"{name} has two factors of different ranks {sorted(ranks)}; peft gives both one rank")
    if ranks:
        r = ranks.pop()
        scale = 1.0 if alpha is None else alpha / max(r, 1)
        if not 1 <= r <= MAX_RANK:
            raise _refuse(file, f"{name} has rank {r}, not from 1 to {MAX_RANK}")
    else:  # the rank only keeps both factors full in peft; the shape check below holds it to the layer
        sides = [side for key in ("lokr_w1", "lokr_w2") for side in tuple(t[key].shape)[:2]]
        r, scale = max(1, math.ceil(max(sides) / 2)), 1.0
    return LayerPlan(part, "lokr", r, scale * r, dict(t))


def loha_plan(part: str, t: dict, alpha: float | None, *, file: str, name: str, module) -> LayerPlan:
    """A LoHa layer: rank of ``hada_w1_b`` (and of ``hada_w2_b``), scale alpha / rank; shapes as peft's."""
    if set(t) != set(LOHA_PARAMS):
        raise _refuse(file, f"{name} has the Hadamard factors {sorted(t)}, not one whole set")
    r = t["hada_w1_b"].shape[0] if t["hada_w1_b"].dim() == 2 else 0
    if not 1 <= r <= MAX_RANK:
        raise _refuse(file, f"{name} has rank {r}, not from 1 to {MAX_RANK}")
    out_dim, in_dim, kernel = _dims(module)
    flat = in_dim * math.prod(kernel)
    expected = {"hada_w1_a": (out_dim, r), "hada_w1_b": (r, flat), "hada_w2_a": (out_dim, r), "hada_w2_b": (r, flat)}
    found = {key: tuple(value.shape) for key, value in t.items()}
    if found != expected:
        raise _refuse(file, f"{name} has shapes {found}, but this model's layer needs {expected}")
    return LayerPlan(part, "loha", r, (alpha if alpha is not None else r), dict(t))


def peft_lokr_shapes(module, *, r: int, factor: int, decompose_both: bool) -> dict[str, tuple[int, ...]]:
    """The shapes of the LoKr factors peft creates on ``module`` for these settings (peft's own rules)."""
    from peft.tuners.lokr.layer import factorization

    out_dim, in_dim, kernel = _dims(module)
    in_m, in_n = factorization(in_dim, factor)
    out_l, out_k = factorization(out_dim, factor)
    full_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
    full_w2 = not r < max(out_k, in_n) / 2
    shapes = {"lokr_w1": (out_l, in_m)} if full_w1 else {"lokr_w1_a": (out_l, r), "lokr_w1_b": (r, in_m)}
    if full_w2:
        return shapes | {"lokr_w2": (out_k, in_n, *kernel)}
    return shapes | {"lokr_w2_a": (out_k, r), "lokr_w2_b": (r, in_n * math.prod(kernel))}


def metadata_factor(metadata: dict[str, str]) -> int | None:
    """LoKr's ``factor`` from kohya's ``ss_network_args`` header, when it holds a sensible one."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
        factor = int(str(args.get("factor", "")).strip()) if isinstance(args, dict) else None
    except (ValueError, TypeError, RecursionError):
        return None
    return factor if factor == -1 or (factor is not None and 1 <= factor <= MAX_FACTOR) else None


def _factor_candidates(plans: list[LayerPlan], metadata: dict[str, str]) -> list[int]:
    """The header's factor, peft's default, then each size a first Kronecker factor has in the file."""
    candidates = [f for f in (metadata_factor(metadata), -1) if f is not None]
    for plan in plans:
        t = plan.tensors
        w1 = tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[-1])
        candidates += [side for side in w1 if side not in candidates]
        if len(candidates) >= MAX_FACTOR_TRIES:
            break
    return candidates[:MAX_FACTOR_TRIES]


def lokr_settings(plans: list[LayerPlan], modules: dict, metadata: dict[str, str], *, file: str) -> tuple[int, bool]:
    """(decompose_factor, decompose_both) under which peft builds every LoKr layer of one component with
    exactly the file's shapes; UserError naming a layer when no factor does."""
    decompose_both = any("lokr_w1_a" in plan.tensors for plan in plans)
    found = {plan.part: {k: tuple(v.shape) for k, v in plan.tensors.items()} for plan in plans}
    for factor in _factor_candidates(plans, metadata):
        fits = all(
            peft_lokr_shapes(modules[p.part], r=p.r, factor=factor, decompose_both=decompose_both) == found[p.part]
            for p in plans
        )
        if fits:
            return factor, decompose_both
    first = plans[0]
    raise _refuse(
        file,
        f"the Kronecker factors of {first.part} ({found[first.part]}) are not a factorisation peft can build "
        "for this model's layer (another tool's option, or a file for another model)",
    )


def adaptable_layers(pipe, kind) -> dict:
    """{``<component>.<module>``: layer} of the Linear and Conv2d layers of the family's denoiser and the text
    encoders its LoRAs adapt: the pipeline's own names, which the webui names are mapped onto."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from core.adapter_files import outer_modules

    components = (kind.denoiser_attr, *(getattr(kind, "adapted_text_encoders", None) or kind.text_encoder_attrs))
    layers = {}
    for component in components:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for name, module in outer_modules(model):  # layers other adapters wrap count as the layer they wrap
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            if type(module) in (torch.nn.Linear, torch.nn.Conv2d):
                layers[f"{component}.{name}"] = module
    return layers


def _placed(name: str, names: dict, *, file: str, model: str, hadamard: bool) -> tuple[str, ...]:
    """The pipeline layers one webui layer changes: one, or (LoHa only) the layers a fused one stacks."""
    found = names.get(name)
    if found is None:
        raise _refuse(file, f"its layer {name[:120]!r} has no place in this {model} model (a file for another model?)")
    parts, how = found
    if how != "rename" and not (how == "fused" and hadamard):
        raise _refuse(
            file,
            f"its layer {name[:120]!r} holds {len(parts)} layers of this model at once ({how}), which only a fused "
            "LoHa can be split back into (a Kronecker product cannot)",
        )
    return parts


def split_loha(parts: tuple[str, ...], t: dict, alpha: float | None, *, layers: dict, file: str, name: str):
    """A fused LoHa layer (q, k, v... stacked along rows) as one LoHa per layer: (w1a·w1b)⊙(w2a·w2b) row by row
    is the same product with the rows of ``hada_w1_a`` and ``hada_w2_a`` taken apart; rank and alpha stay."""
    if any(t[key].dim() != 2 for key in LOHA_PARAMS):
        raise _refuse(file, f"{name} has factors of shapes {[tuple(v.shape) for v in t.values()]}, not matrices")
    rows = [_dims(layers[part])[0] for part in parts]
    heights = {tuple(t[key].shape)[0] for key in ("hada_w1_a", "hada_w2_a") if key in t}
    if heights != {sum(rows)}:
        raise _refuse(file, f"{name} has {sorted(heights)} rows, but the layers it stacks have {sum(rows)}")
    plans, start = [], 0
    for part, count in zip(parts, rows, strict=True):
        piece = t | {key: t[key][start : start + count].contiguous() for key in ("hada_w1_a", "hada_w2_a")}
        plans.append(loha_plan(part, piece, alpha, file=file, name=name, module=layers[part]))
        start += count
    return plans


def layer_plans(state: dict, pipe, kind, *, file: str) -> tuple[list[LayerPlan], dict]:
    """Every layer of a LyCORIS-layout state dict, placed on ``pipe``'s layers and planned for peft."""
    layers = adaptable_layers(pipe, kind)
    grouped = group_layers(state, file=file)
    if len(grouped) > len(layers):
        raise _refuse(file, f"it has {len(grouped)} layers, more than this {kind.display_name} model's {len(layers)}")
    names = kind.lycoris_names(list(layers))
    plans = []
    for name, tensors in grouped.items():
        alpha = layer_alpha(tensors, file=file, name=name)
        if not tensors:
            raise _refuse(file, f"{name} has an alpha but no weights")
        hadamard = not any(key.startswith("lokr_") for key in tensors)
        parts = _placed(name, names, file=file, model=kind.display_name, hadamard=hadamard)
        if not hadamard:
            plans.append(lokr_plan(parts[0], tensors, alpha, file=file, name=name))
        elif set(tensors) != set(LOHA_PARAMS):
            raise _refuse(file, f"{name} has the Hadamard factors {sorted(tensors)}, not one whole set")
        else:
            plans += split_loha(parts, tensors, alpha, layers=layers, file=file, name=name)
    if len({plan.network for plan in plans}) > 1:
        raise _refuse(file, "it mixes LoKr and LoHa layers")
    twice = [part for part, count in Counter(plan.part for plan in plans).items() if count > 1]
    if twice:
        raise _refuse(file, f"two of its layers change the same layer {twice[0]}")
    return plans, layers


def component_config(plans: list[LayerPlan], modules: dict, metadata: dict[str, str], *, file: str) -> ComponentConfig:
    """The peft settings of one component: the most common rank and alpha as defaults, each other layer's
    as a whole-name (``^``) pattern, every layer named in full as a target."""
    names = {plan.part: plan.part.split(".", 1)[1] for plan in plans}
    (r, alpha), _ = Counter((plan.r, plan.alpha) for plan in plans).most_common(1)[0]
    factor, decompose_both = -1, False
    if plans[0].network == "lokr":
        factor, decompose_both = lokr_settings(plans, modules, metadata, file=file)
    return ComponentConfig(
        network=plans[0].network,
        r=r,
        alpha=alpha,
        rank_pattern={"^" + names[p.part]: p.r for p in plans if p.r != r},
        alpha_pattern={"^" + names[p.part]: p.alpha for p in plans if p.alpha != alpha},
        target_modules=tuple(sorted(names.values())),
        decompose_both=decompose_both,
        decompose_factor=factor,
    )


def lycoris_adapter(pipe, state: dict, metadata: dict[str, str], *, file: str) -> tuple[dict, dict]:
    """(state dict, {component: ComponentConfig}) in peft's LoKr/LoHa layout for the LyCORIS-layout file's
    ``state`` on ``pipe``: what :func:`core.adapter_files._add_lycoris` adds. Injects nothing."""
    from families import display_name, family, family_of_pipeline, lora_family

    own = family_of_pipeline(type(pipe).__name__)
    if own is None:
        raise _refuse(file, f"the loaded pipeline {type(pipe).__name__} is of no known model family")
    made_for = lora_family(list(state)[:2000], metadata)
    if made_for is not None and made_for != own:
        raise _refuse(file, f"it is a {display_name(made_for)} LoRA and the model is {display_name(own)}")
    kind = family(own)
    plans, layers = layer_plans(state, pipe, kind, file=file)
    by_component: dict[str, list[LayerPlan]] = {}
    for plan in plans:
        by_component.setdefault(plan.part.split(".", 1)[0], []).append(plan)
    configs = {
        component: component_config(group, layers, metadata, file=file) for component, group in by_component.items()
    }
    peft_state = {f"{plan.part}.{name}": tensor for plan in plans for name, tensor in plan.tensors.items()}
    return peft_state, configs


def check_applied(pipe, configs: dict, *, adapter_name: str, file: str) -> None:
    """Each adapted layer holds the rank and scale planned for it (peft matched every pattern as intended)."""
    for component, config in configs.items():
        model = getattr(pipe, component)
        for module in config.target_modules:
            layer = model.get_submodule(module)
            r, scale = layer.r.get(adapter_name), layer.scaling.get(adapter_name)
            want = config.rank_of(module), config.alpha_of(module) / config.rank_of(module)
            if r != want[0] or scale is None or not math.isclose(scale, want[1], rel_tol=1e-6):
                raise _refuse(file, f"peft gave {component}.{module} rank {r} and scale {scale}, not {want}")
