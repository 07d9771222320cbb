"""The same train command under `accelerate launch --num_processes 2` (CPU, gloo)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from core.demo_models import DEMO_SDXL_NAME
from modules.lora_training.project import ProjectPaths
from modules.lora_training.runs import latest_run
from tests.conftest import ROOT, write_config


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
