"""The paths a GPU user takes, on the CPU: frozen weights in fp16 or bf16, both families,
cached and uncached inputs, samples during training, the webui copy, Generate with the LoRA.

Each cell's LoRA is loaded into a fresh plain diffusers pipeline and fused: every layer's
weight change must equal B @ A * alpha / r, with alpha != r so a lost alpha shows.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from core.model_manager import GenerationRequest, LoraChoice, ModelManager
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import Log, SampleSaved
from modules.lora_training.lora_layouts import split_down_key
from modules.lora_training.train import train
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME

RANK, ALPHA = 4, 8.0
MODELS = {"sdxl": DEMO_SDXL_NAME, "flux": DEMO_FLUX_NAME}
CELLS = [
    # family, precision, cached, text-encoder LoRA
    ("sdxl", "fp16", True, False),
    ("sdxl", "fp16", False, True),
    ("sdxl", "bf16", True, False),
    ("sdxl", "bf16", False, False),
    ("flux", "fp16", True, False),
    ("flux", "fp16", False, False),
    ("flux", "bf16", True, False),
    ("flux", "bf16", False, True),
]


@pytest.fixture(scope="module")
def workspace(sdxl_project, tmp_path_factory, models_dir):
    """One copy of the prepared project, one loras folder and one Generate-tab ModelManager for every cell."""
    projects, name = sdxl_project
    root = tmp_path_factory.mktemp("precision")
    shutil.copytree(projects, root / "projects")
    shutil.rmtree(root / "projects" / name / "checkpoints", ignore_errors=True)
    manager = ModelManager(models_dir=models_dir, loras_dir=root / "loras", device="cpu")
    return root, name, manager


def _lora_layers(path):
    """{(component, module path): (A, B)} from a LoRA file written by the trainer."""
    layers = {}
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        for key in keys:
            # Any spelling the main file uses (PEFT, diffusers' processor names), as the model names the module.
            split = split_down_key(key)
            if split is not None:
                component, _, module = split[2].partition(".")
                layers[(component, module)] = (handle.get_tensor(key).float(), handle.get_tensor(split[1]).float())
        metadata = handle.metadata()
    return layers, metadata


def _weight(pipe, component: str, module: str) -> torch.Tensor:
    model = getattr(pipe, component)
    for path in (module, module.replace("text_model.", "", 1), "text_model." + module):
        try:
            layer = model.get_submodule(path)
            break
        except AttributeError:
            continue
    return getattr(layer, "base_layer", layer).weight.detach().float().clone()


def _check_fused_deltas(models_dir, family: str, lora_path) -> int:
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline
    pipe = pipeline_class.from_pretrained(str(models_dir / MODELS[family]))
    layers, metadata = _lora_layers(lora_path)
    assert "lora_adapter_metadata" in metadata
    before = {key: _weight(pipe, *key) for key in layers}
    pipe.load_lora_weights(str(lora_path))
    # Flux's fuse_lora fuses only the transformer unless told: fuse the text encoder too.
    pipe.fuse_lora(components=list(pipe._lora_loadable_modules))
    for key, (down, up) in layers.items():
        expected = up.flatten(1) @ down.flatten(1) * (ALPHA / RANK)
        change = _weight(pipe, *key) - before[key]
        assert torch.allclose(change, expected, atol=1e-5 + 1e-3 * expected.abs().max().item()), key
    return len(layers)


def _assert_real_image(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 5, "a blank image (NaN latents decode to one flat colour)"
    return pixels


@pytest.mark.parametrize(("family", "precision", "cached", "text_lora"), CELLS)
def test_half_precision_cell(workspace, models_dir, family, precision, cached, text_lora):
    root, project, manager = workspace
    lora_name = f"{family}-{precision}-{'cached' if cached else 'uncached'}"
    options = {
        "project": project,
        "base_model": MODELS[family],
        "name": lora_name,
        "steps": 2,
        "rank": RANK,
        "alpha": ALPHA,
        "learning_rate": 5e-3,
        "mixed_precision": precision,
        "cache_latents": cached,
        "cache_text_embeddings": cached,
        "train_text_encoder": text_lora,
        "sample_every_steps": 2,
        "sample_steps": 2,
        "sample_prompts": ["{trigger}", "{trigger} on a beach"],
        "flip": True,
        "lora_targets": "attention" if family == "flux" and not cached else "auto",
    }
    events = []
    result = train(
        config_from_dict(TrainConfig, options),
        projects_dir=root / "projects",
        models_dir=models_dir,
        loras_dir=root / "loras",
        on_event=events.append,
    )
    logs = [e.message for e in events if isinstance(e, Log)]
    assert result.status == "finished", (result.message, logs)
    assert any(f"precision {precision}" in line for line in logs)
    warnings = [e.message for e in events if isinstance(e, Log) and e.level == "warning"]
    assert not [w for w in warnings if "Sample" in w or "webui" in w], warnings

    samples = [e for e in events if isinstance(e, SampleSaved)]
    assert len(samples) == 2 and all(e.step == 2 for e in samples)
    for event in samples:
        _assert_real_image(event.path)

    assert (root / "loras" / "webui" / f"{lora_name}.safetensors").is_file(), logs
    assert _check_fused_deltas(models_dir, family, result.lora_path) > 0
    assert _lora_layers(result.lora_path)[1]["lora_studio.family"] == family
    if text_lora:
        assert any(component.startswith("text_encoder") for component, _ in _lora_layers(result.lora_path)[0])

    request = dict(model=MODELS[family], prompt="ohwx", steps=2, width=64, height=64, seed=3)
    plain = _assert_real_image(manager.generate(GenerationRequest(**request)).image)
    styled = manager.generate(GenerationRequest(**request, loras=(LoraChoice(f"{lora_name}.safetensors", 1.0),)))
    assert np.abs(_assert_real_image(styled.image) - plain).max() > 0, "the LoRA changes the image"
