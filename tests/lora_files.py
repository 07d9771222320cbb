"""Write small LoRA files with diffusers' own saver, for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from families.flux_configs import FLUX_DEV_TRANSFORMER


def _randomize_lora(model, *, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def write_diffusers_lora(
    model_dir: Path, out_path: Path, *, family: str, seed: int = 0, rank: int = 4, alpha: float = 4.0, scale=0.3
) -> Path:
    """A LoRA for the model in ``model_dir`` with random non-zero A and B, via ``save_lora_weights``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    if family == "sdxl":
        model = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    else:
        model = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    model.add_adapter(config)
    _randomize_lora(model, seed=seed, scale=scale)
    layers = get_peft_model_state_dict(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if family == "sdxl":
        StableDiffusionXLPipeline.save_lora_weights(
            out_path.parent,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=config.to_dict(),
            weight_name=out_path.name,
        )
    else:
        FluxPipeline.save_lora_weights(
            out_path.parent,
            transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=config.to_dict(),
            weight_name=out_path.name,
        )
    return out_path


# ----- full-size layouts, without full-size weights --------------------------------------
SDXL_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
SDXL_FEEDFORWARD = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FLUX_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX_FEEDFORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
FLUX_DEV = FLUX_DEV_TRANSFORMER


def _targeted_linears(model, targets, prefix: str) -> dict[str, tuple[int, int]]:
    """``prefix.name`` → (out, in) of each Linear whose name ends with a target (PEFT's matching)."""
    import torch

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            found[f"{prefix}.{name}"] = (module.out_features, module.in_features)
    return found


def full_size_flux(**overrides):
    """Flux.1 dev's transformer on the meta device (no memory for weights)."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**{**FLUX_DEV, **overrides})


def full_size_flux_linears(targets, **overrides) -> dict[str, tuple[int, int]]:
    """Flux.1 dev's targeted Linear layers (``overrides`` change its config, e.g. a narrow width);
    ``single.proj_out`` targets the single blocks' output layer."""
    model = full_size_flux(**overrides)
    plain = [t for t in targets if t != "single.proj_out"]
    found = _targeted_linears(model, plain, "transformer")
    if "single.proj_out" in targets:
        found.update(
            _targeted_linears(model.single_transformer_blocks, ["proj_out"], "transformer.single_transformer_blocks")
        )
    return found


def full_size_sdxl_linears(targets, *, text_encoders: bool) -> dict[str, tuple[int, int]]:
    """SDXL base 1.0's targeted Linear layers (U-Net, and both CLIP encoders' attention when asked)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from families.sdxl_configs import SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_UNET

    with torch.device("meta"):
        found = _targeted_linears(UNet2DConditionModel.from_config(SDXL_UNET), targets, "unet")
        if text_encoders:
            first = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER))
            second = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2))
            found.update(_targeted_linears(first, TEXT_ENCODER_TARGETS, "text_encoder"))
            found.update(_targeted_linears(second, TEXT_ENCODER_TARGETS, "text_encoder_2"))
    return found


def random_lora_layers(shapes: dict[str, tuple[int, int]], *, rank: int, seed: int = 0, scale: float = 0.05):
    """PEFT-style ``<module>.lora_A/B.weight`` fp16 tensors of rank ``rank`` for each (out, in)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for module, (out_features, in_features) in shapes.items():
        down = torch.randn(rank, in_features, generator=generator) * scale
        layers[f"{module}.lora_A.weight"] = down.to(torch.float16)
        layers[f"{module}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * scale).half()
    return layers


def write_app_lora(path: Path, layers: dict, *, family: str, rank: int, alpha: float) -> Path:
    """``layers`` saved as the trainer saves a LoRA (LoraFamily.save_lora): diffusers' ``save_lora_weights``
    with adapter metadata per component, fp16 tensors, then the ``lora_studio.*`` header keys."""
    import tempfile

    from diffusers import FluxPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    pipeline = StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline
    kwargs = {}
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        prefix = f"{component}."
        part = {k[len(prefix) :]: v for k, v in layers.items() if k.startswith(prefix)}
        if part:
            targets = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in part})
            kwargs[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(part)
            kwargs[f"{component}_lora_adapter_metadata"] = LoraConfig(
                r=rank, lora_alpha=alpha, target_modules=targets
            ).to_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        pipeline.save_lora_weights(scratch, weight_name="lora.safetensors", **kwargs)
        with safe_open(str(Path(scratch) / "lora.safetensors"), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    header.update(
        {
            "lora_studio.family": family,
            "lora_studio.base_model": f"full-size-{family}-RANDOM",
            "lora_studio.resolution": "1024",
            "lora_studio.steps": "1",
            "lora_studio.trigger_word": "ohwx",
            "lora_studio.rank": str(rank),
            "lora_studio.alpha": f"{alpha:g}",
        }
    )
    save_file(tensors, str(path), metadata=header)
    return path
