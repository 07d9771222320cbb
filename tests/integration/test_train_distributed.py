"""Training in two processes (CPU, gloo): under `accelerate launch` and `torchrun`, against one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.metrics import read_metrics
from modules.lora_training.project import ProjectPaths
from modules.lora_training.runs import latest_run, list_runs
from modules.lora_training.train import train
from tests.conftest import ROOT, write_config
from tests.demo_names import DEMO_SDXL_NAME


def test_accelerate_launch_two_processes(sdxl_project, models_dir, tmp_path):
    projects, name = sdxl_project
    shutil.copytree(projects, tmp_path / "projects")
    config = write_config(tmp_path, models_dir, LORA_PROJECTS_DIR=str(tmp_path / "projects"))
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "modules.lora_training", "--app-config", str(config), "train",
        "--project", name, "--base-model", DEMO_SDXL_NAME, "--steps", "3", "--name", "ddp", "--rank", "4",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "processes 2" in done.stdout
    assert done.stdout.count("LoRA saved:") == 1, "only the main process writes"
    lora = tmp_path / "loras" / "ddp.safetensors"
    with safe_open(str(lora), framework="pt") as handle:
        assert json.loads(handle.metadata()["lora_studio.training_config"])["steps"] == 3
    run = latest_run(ProjectPaths.for_project(tmp_path / "projects", name))
    metrics = (run.logs / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3, "one metrics line per step, from rank 0 only"


def _three_image_project(sdxl_project, tmp_path) -> Path:
    """The prepared project with its fourth image left out: 3 images in global batches of 2 make a last
    batch of one sample, which the second process can only repeat with weight 0."""
    projects, name = sdxl_project
    copy = tmp_path / "projects"
    shutil.copytree(projects, copy)
    shutil.rmtree(copy / name / "runs", ignore_errors=True)
    paths = ProjectPaths.for_project(copy, name)
    manifest = json.loads(paths.manifest.read_text())
    used = [entry for entry in manifest["images"] if entry.get("status") == "used"]
    manifest["images"] = used[:3]
    paths.manifest.write_text(json.dumps(manifest))
    return copy


# Per-sample randomness on (flip, caption dropout, noise offset), a text-encoder LoRA (whose last CLIP
# layer gets no gradient), gradient checkpointing and accumulation (DDP's no_sync on the first micro-batch).
EQUALITY_OPTIONS = {
    "steps": 2, "rank": 4, "learning_rate": 1e-3, "gradient_accumulation": 2, "gradient_checkpointing": True,
    "flip": True, "caption_dropout": 0.3, "noise_offset": 0.1, "train_text_encoder": True,
    "seed": 7, "device": "cpu",
}  # fmt: skip


def test_two_processes_train_the_same_lora_as_one_process_with_the_same_global_batch(
    sdxl_project, models_dir, tmp_path
):
    """2 processes x batch 1 under torchrun against 1 process x batch 2, in-process: the same images, flips,
    dropped captions, noise and timesteps at every step, so the same LoRA up to float rounding."""
    projects = _three_image_project(sdxl_project, tmp_path)
    name = sdxl_project[1]
    config = write_config(tmp_path, models_dir, LORA_PROJECTS_DIR=str(projects))
    flags = [
        f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}") for key, value in EQUALITY_OPTIONS.items()
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "modules.lora_training", "--app-config", str(config), "train", "--project", name,
        "--base-model", DEMO_SDXL_NAME, "--name", "two", "--batch-size", "1", "--no-also-save-webui", *flags,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "batch 1 x accumulation 2 x processes 2" in done.stdout

    one = config_from_dict(
        TrainConfig,
        {"project": name, "base_model": DEMO_SDXL_NAME, "name": "one", "batch_size": 2, "also_save_webui": False}
        | EQUALITY_OPTIONS,
    )
    result = train(one, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path / "loras", new_run=True)
    assert result.status == "finished" and result.step == 2

    runs = list_runs(ProjectPaths.for_project(projects, name))
    losses = [[record["loss"] for record in read_metrics(run.logs)] for run in runs]
    assert len(losses) == 2 and len(losses[0]) == 2
    # The same samples with the same noise give the same loss before any update, and after the first.
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)

    two = load_file(str(tmp_path / "loras" / "two.safetensors"))
    single = load_file(str(result.lora_path))
    assert two.keys() == single.keys()
    ups = [key for key in single if key.startswith("unet.") and ".up." in key]
    assert all(single[key].abs().max() > 1e-4 for key in ups), "the LoRA did not train"
    difference = torch.cat([(two[key] - single[key]).abs().flatten() for key in single])
    # Adam scales each gradient element to a step of about lr (1e-3): rounding differences (batch 2 against
    # 1 + 1, the all-reduce's order) can flip the step of an element whose gradient is ~0, so a few elements
    # may differ by up to 2 lr. A sample taken twice, or given other noise, moves most elements by ~lr.
    assert float(difference.mean()) < 1e-6, f"mean difference {float(difference.mean()):.2g}"
    assert float((difference > 1e-5).float().mean()) < 1e-3, f"{int((difference > 1e-5).sum())} elements differ"
