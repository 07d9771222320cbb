"""open_clip's CLIP folders (``open_clip_config.json`` + ``open_clip_model.safetensors``) as a transformers CLIPModel.

Only the original CLIP architecture converts: a ViT image tower pooled on its class token, a causal text tower
pooled on its end token, both with plain residual blocks (no layer scale, no attentional pooler, no timm or
Hugging Face towers). Anything else is refused with a message naming the setting. The weights are renamed
here, one name at a time (open_clip's fused ``in_proj`` attention is split into q, k and v); nothing of
open_clip is imported.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from core.regular_files import UnreadableFile, load_safetensors_bounded

MAX_CLIP_WEIGHTS_BYTES = 16 * 2**30

# open_clip settings that change the architecture away from the original CLIP, with the value that keeps it.
_PLAIN_BLOCK = {  # residual-block settings both towers have
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "block_type": None,
}
_PLAIN_VISION = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "pool_type": "tok",
    "timm_model_name": None,
    **_PLAIN_BLOCK,
}
_PLAIN_TEXT = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    **_PLAIN_BLOCK,
}
# Per residual block: open_clip's name → transformers' name (the fused in_proj is split separately).
_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _check_plain(config: dict, plain: dict, *, tower: str, path: Path) -> None:
    for key, value in plain.items():
        if config.get(key, value) != value:
            raise UserError(
                f"{path}: the {tower} tower's {key} is {config[key]!r}; only the original CLIP architecture "
                "(ViT image tower, causal text tower) converts. Use a transformers-format CLIP instead."
            )


def _side(value, *, path: Path, high: int = 4096) -> int:
    sides = value if isinstance(value, list | tuple) else (value, value)
    if len(sides) != 2 or len(set(sides)) != 1:
        raise UserError(f"{path}: non-square CLIP images ({sides}) are not supported.")
    return _whole({"image side": sides[0]}, "image side", default=0, high=high, path=path)


def _whole(tower: dict, key: str, *, default: int, high: int, path: Path) -> int:
    """A size of the config: a whole number from 1 to ``high`` (a crafted file must not size the model)."""
    value = tower.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise UserError(f"{path}: {key} must be a whole number from 1 to {high}; got {value!r}.")
    return value


def _ratio(tower: dict, *, path: Path) -> float:
    value = tower.get("mlp_ratio", 4.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 16:
        raise UserError(f"{path}: mlp_ratio must be a number above 0 and at most 16; got {value!r}.")
    return float(value)


def _heads(width: int, *, path: Path, head_width: int | None = None, heads: int | None = None) -> int:
    """How many attention heads a tower of ``width`` has (given their width or their number)."""
    heads = heads or width // head_width
    if width % heads or (head_width and heads * head_width != width):
        raise UserError(f"{path}: a width of {width} does not split into equal attention heads.")
    return heads


def clip_config_from_open_clip(model_cfg: dict, *, path: Path):
    """The transformers ``CLIPConfig`` of an open_clip ``model_cfg`` (UserError for other architectures)."""
    from transformers import CLIPConfig

    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if "embed_dim" not in model_cfg or not isinstance(vision, dict) or not isinstance(vision.get("layers", 12), int):
        raise UserError(f"{path}: only ViT CLIP models convert (this one has no embed_dim or a ResNet image tower).")
    if not isinstance(text, dict):
        raise UserError(f"{path}: text_cfg must be an object.")
    _check_plain(vision, _PLAIN_VISION, tower="image", path=path)
    _check_plain(text, _PLAIN_TEXT, tower="text", path=path)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width = _whole(vision, "width", default=768, high=8192, path=path)
    t_width = _whole(text, "width", default=512, high=8192, path=path)
    side = _side(vision.get("image_size", 224), path=path)
    head_width = _whole(vision, "head_width", default=64, high=v_width, path=path)
    vision_config = {
        "hidden_size": v_width,
        "intermediate_size": max(1, int(v_width * _ratio(vision, path=path))),
        "num_hidden_layers": _whole(vision, "layers", default=12, high=128, path=path),
        "num_attention_heads": _heads(v_width, head_width=head_width, path=path),
        "image_size": side,
        "patch_size": _side(vision.get("patch_size", 16), path=path, high=side),
        "hidden_act": act,
    }
    heads = _whole(text, "heads", default=8, high=t_width, path=path)
    text_config = {
        "vocab_size": _whole(text, "vocab_size", default=49408, high=1_000_000, path=path),
        "hidden_size": t_width,
        "intermediate_size": max(1, int(t_width * _ratio(text, path=path))),
        "num_hidden_layers": _whole(text, "layers", default=12, high=128, path=path),
        "num_attention_heads": _heads(t_width, heads=heads, path=path),
        "max_position_embeddings": _whole(text, "context_length", default=77, high=4096, path=path),
        "hidden_act": act,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    dim = _whole(model_cfg, "embed_dim", default=512, high=8192, path=path)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=dim)


def _tower_names(model) -> tuple[str, str]:
    """The attribute names of a CLIPModel's text and image towers, found by what their embeddings hold."""
    children = dict(model.named_children())
    embeddings = {name: getattr(child, "embeddings", None) for name, child in children.items()}
    text = next(name for name, found in embeddings.items() if hasattr(found, "token_embedding"))
    vision = next(name for name, found in embeddings.items() if hasattr(found, "class_embedding"))
    return text, vision


def _blocks(state: dict, source: str, target: str) -> dict:
    """Rename the residual blocks under ``source`` (``...transformer.resblocks.<i>.``) to ``target``'s layers."""
    out = {}
    for key, value in state.items():
        if not key.startswith(source):
            continue
        index, rest = key[len(source) :].split(".", 1)
        layer = f"{target}.encoder.layers.{index}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]  # weight or bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{layer}self_attn.{name}.{kind}"] = part
            continue
        module, kind = rest.rsplit(".", 1)
        if module not in _BLOCK_NAMES:
            raise UserError(f"Unknown open_clip weight {key!r}: only the original CLIP architecture converts.")
        out[f"{layer}{_BLOCK_NAMES[module]}.{kind}"] = value
    return out


def convert_open_clip_state_dict(state: dict, *, text: str, vision: str) -> dict:
    """open_clip's CLIP weights under transformers' CLIPModel names (``text``/``vision``: its tower attributes)."""
    single = {
        "visual.class_embedding": f"{vision}.embeddings.class_embedding",
        "visual.conv1.weight": f"{vision}.embeddings.patch_embedding.weight",
        "visual.positional_embedding": f"{vision}.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": f"{vision}.pre_layrnorm.weight",
        "visual.ln_pre.bias": f"{vision}.pre_layrnorm.bias",
        "visual.ln_post.weight": f"{vision}.post_layernorm.weight",
        "visual.ln_post.bias": f"{vision}.post_layernorm.bias",
        "token_embedding.weight": f"{text}.embeddings.token_embedding.weight",
        "positional_embedding": f"{text}.embeddings.position_embedding.weight",
        "ln_final.weight": f"{text}.final_layer_norm.weight",
        "ln_final.bias": f"{text}.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    transposed = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
    out = {single[key]: value for key, value in state.items() if key in single}
    out |= {transposed[key]: value.T.contiguous() for key, value in state.items() if key in transposed}
    out |= _blocks(state, "visual.transformer.resblocks.", vision)
    out |= _blocks(state, "transformer.resblocks.", text)
    known = set(single) | set(transposed)
    unknown = [k for k in state if k not in known and not k.startswith(("visual.transformer.", "transformer."))]
    if unknown:
        raise UserError(f"Unknown open_clip weights {unknown[:5]}: only the original CLIP architecture converts.")
    return out


def _image_processor(preprocess_cfg: dict, side: int, *, path: Path):
    from model_formats.demo_models import clip_image_processor_class

    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise UserError(f"{path}: resize_mode {mode!r} is not supported (only 'shortest' and 'squash').")
    resample = {"bicubic": 3, "bilinear": 2}.get(preprocess_cfg.get("interpolation", "bicubic"), 3)
    size = {"shortest_edge": side} if mode == "shortest" else {"height": side, "width": side}
    keep = {k: preprocess_cfg[v] for k, v in (("image_mean", "mean"), ("image_std", "std")) if v in preprocess_cfg}
    return clip_image_processor_class()(
        size=size,
        crop_size={"height": side, "width": side},
        do_center_crop=mode == "shortest",
        resample=resample,
        **keep,
    )


def load_open_clip(folder: Path, *, root: Path):
    """``(CLIPModel, tokenizer, image processor)`` from an open_clip folder (already checked by ``clip_format``)."""
    import torch
    from transformers import CLIPModel

    from model_formats.tokenizers import build_clip_tokenizer
    from modules.lora_training.clip_scores import OPEN_CLIP_FILES, read_json_file

    config_path = folder / OPEN_CLIP_FILES[0]
    raw = read_json_file(config_path, root=root)
    model_cfg = raw.get("model_cfg", raw)
    config = clip_config_from_open_clip(model_cfg, path=config_path)
    with torch.device("meta"):  # shapes only: the weights are compared with them before anything is allocated
        model = CLIPModel(config)
    text, vision = _tower_names(model)
    weights = folder / OPEN_CLIP_FILES[1]
    try:
        loaded = load_safetensors_bounded(weights, max_bytes=MAX_CLIP_WEIGHTS_BYTES)
    except UnreadableFile as exc:
        raise UserError(f"{weights} is not a readable safetensors file ({exc}).") from exc
    state = convert_open_clip_state_dict(loaded, text=text, vision=vision)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [k for k, v in state.items() if k not in expected or expected[k].shape != v.shape]
    if missing or wrong:
        raise UserError(
            f"{weights} does not match {config_path}: missing {missing[:3]}, unexpected or misshapen {wrong[:3]}."
        )
    model = CLIPModel(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    side = config.vision_config.image_size
    processor = _image_processor(raw.get("preprocess_cfg", {}), side, path=config_path)
    tokenizer = build_clip_tokenizer()
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    return model.eval(), tokenizer, processor
