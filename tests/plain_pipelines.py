"""The demo pipelines loaded by diffusers alone (no app code), and one fixed image from them: how a user
outside this app loads our LoRA files, for the tests that check those files."""

from __future__ import annotations

import json

import numpy as np
import torch

from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME

DEMO_MODELS = {"sdxl": DEMO_SDXL_NAME, "flux": DEMO_FLUX_NAME}


def plain_pipeline(models_dir, family: str):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline
    return cls.from_pretrained(str(models_dir / DEMO_MODELS[family]))


def plain_image(pipe, family: str) -> np.ndarray:
    """The image for one prompt and seed at 64 px, 3 steps (as float pixels, to compare)."""
    kwargs = {"guidance_scale": 5.0 if family == "sdxl" else 3.5}
    out = pipe("ohwx, a photo", num_inference_steps=3, width=64, height=64, generator=torch.manual_seed(5), **kwargs)
    return np.asarray(out.images[0], dtype=np.float32)


def plain_load(pipe, path, network: str, *, adapter_name: str) -> None:
    """A main file loaded with diffusers (LoRA/DoRA) or with peft alone (LoKr/LoHa), no app code."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    if network in ("lora", "dora"):
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
        return
    with safe_open(str(path), framework="pt") as handle:
        packed = json.loads(handle.metadata()["lora_adapter_metadata"])
    tensors = load_file(str(path))
    for component in {key.split(".", 1)[0] for key in tensors}:
        fields = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith(f"{component}.")}
        cls = LoKrConfig if fields.pop("peft_type") == "LOKR" else LoHaConfig
        known = set(cls.__dataclass_fields__) - {"peft_type"}
        config = cls(**{k: v for k, v in fields.items() if k in known})
        model = getattr(pipe, component)
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{component}.")}
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        assert not result.unexpected_keys, result.unexpected_keys[:3]
