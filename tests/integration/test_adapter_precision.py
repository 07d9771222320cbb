"""LoKr, LoHa and DoRA in the precisions a GPU user picks, on the CPU: frozen weights in fp16 (with the
GradScaler) or bf16, both families, two steps each. The adapter trains in fp32 beside the half-precision
base as LoRA does, every step is applied, the main file loads in plain diffusers/peft and the webui copy
is written, finite and verified."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import Log
from tests.half_precision import HALF, all_steps_applied, run_trainer, trained_in
from tests.plain_pipelines import DEMO_MODELS, plain_image, plain_load, plain_pipeline

# The part of each adapter that starts at zero: non-zero once an optimizer step was applied.
ZERO_AT_START = {"lokr": (".lokr_w1",), "loha": (".hada_w2_b",), "dora": (".lora_B.weight", ".lora.up.weight")}
# Each network on both families and in both precisions, each family in both precisions: six short runs.
CELLS = [
    ("sdxl", "lokr", "fp16"),
    ("flux", "lokr", "bf16"),
    ("sdxl", "loha", "bf16"),
    ("flux", "loha", "fp16"),
    ("sdxl", "dora", "fp16"),
    ("flux", "dora", "bf16"),
]
STEPS = 2


@pytest.fixture(scope="module")
def workspace(sdxl_project, tmp_path_factory):
    """One copy of the prepared project for every cell (each cell trains its own named LoRA)."""
    projects, name = sdxl_project
    root = tmp_path_factory.mktemp("adapter-precision")
    shutil.copytree(projects, root / "projects")
    shutil.rmtree(root / "projects" / name / "runs", ignore_errors=True)
    return root, name


@pytest.fixture(scope="module")
def plain_pipes(models_dir):
    """A plain diffusers pipeline per family and loader (diffusers' for DoRA, peft's for LoKr/LoHa), loaded
    once, and its image without an adapter."""
    pipes = {}

    def get(family: str, network: str):
        key = (family, network == "dora")
        if key not in pipes:
            pipe = plain_pipeline(models_dir, family)
            pipes[key] = (pipe, plain_image(pipe, family))
        return pipes[key]

    return get


@pytest.mark.parametrize(("family", "network", "precision"), CELLS, ids=["-".join(c) for c in CELLS])
def test_adapter_trains_in_half_precision(workspace, models_dir, plain_pipes, family, network, precision):
    root, project = workspace
    name = f"{family}-{network}-{precision}"
    values = {"project": project, "base_model": DEMO_MODELS[family], "name": name, "steps": STEPS, "seed": 5}
    values |= {"network": network, "rank": 4, "alpha": 2.0, "factor": 4 if network == "lokr" else -1}
    values |= {"learning_rate": 1e-2, "mixed_precision": precision, "lora_targets": "attention+feedforward"}
    values |= {"train_text_encoder": network == "loha" or (network, family) == ("dora", "sdxl")}
    values |= {"validation_share": 0.0}
    trainer, result, events = run_trainer(config_from_dict(TrainConfig, values), root=root, models_dir=models_dir)
    all_steps_applied(trainer, result, events)
    assert result.step == STEPS
    assert any(f"precision {precision}" in e.message for e in events if isinstance(e, Log))
    trained_in(trainer, half=HALF[precision])
    assert (trainer.scaler is not None) == (precision == "fp16"), "fp16 trains with the GradScaler, bf16 without"

    main = load_file(str(result.lora_path))
    assert all(torch.isfinite(v.float()).all() for v in main.values())
    started_at_zero = {k: v for k, v in main.items() if k.endswith(ZERO_AT_START[network])}
    moved = {k for k, v in started_at_zero.items() if v.abs().max() > 0}
    # Every denoiser layer moved; SDXL reads the penultimate CLIP layer, so the last one gets no gradient.
    unmoved = [k for k in started_at_zero.keys() - moved if not k.startswith("text_encoder")]
    assert started_at_zero and not unmoved, f"{len(unmoved)} layers did not move: {unmoved[:4]}"
    assert not values["train_text_encoder"] or any(k.startswith("text_encoder") for k in moved)

    copy = root / "loras" / "webui" / result.lora_path.name
    assert copy.is_file(), [e.message for e in events if isinstance(e, Log)]
    webui = load_file(str(copy))
    assert webui and all(torch.isfinite(v.float()).all() for v in webui.values())
    assert any(e.message.startswith("Webui copy") and "verified" in e.message for e in events if isinstance(e, Log))

    pipe, plain = plain_pipes(family, network)
    plain_load(pipe, result.lora_path, network, adapter_name=name)
    try:
        pipe.set_adapters([name])
        image = plain_image(pipe, family)
    finally:
        pipe.delete_adapters([name])
    assert np.isfinite(image).all() and np.abs(image - plain).max() > 0, "the adapter changes the image"
