"""Crashes, full disks and exposure: nothing lost, nobody in."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import safetensors.torch
from safetensors import safe_open

from model_formats import safetensors_stream
from modules.lora_training.checkpoints import latest_checkpoint, load_checkpoint
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import Failed
from modules.lora_training.jobs import interrupted_projects
from modules.lora_training.project import ProjectPaths
from modules.lora_training.runs import latest_run
from modules.lora_training.train import train
from tests.conftest import ROOT, write_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.lora_files import write_diffusers_lora
from tests.server import running_app


def _assert_everything_loads(loras, checkpoints):
    for path in loras.rglob("*.safetensors"):
        if any(part.startswith(".") for part in path.relative_to(loras).parts):
            continue  # temporaries are hidden and never listed
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                handle.get_tensor(key)
    newest = latest_checkpoint(checkpoints)
    if newest is not None:
        assert load_checkpoint(newest).step > 0


@pytest.mark.parametrize("kill_after", ["checkpoint+0.01", "checkpoint+0.06", "final+0.02"])
def test_sigkill_while_saving_loses_nothing(sdxl_project, models_dir, demo_paths, tmp_path, kill_after):
    projects, name = sdxl_project
    shutil.copytree(projects, tmp_path / "projects")
    config = write_config(tmp_path, models_dir, LORA_PROJECTS_DIR=str(tmp_path / "projects"))
    loras = tmp_path / "loras"
    keep = write_diffusers_lora(demo_paths.sdxl_folder, loras / "keep.safetensors", family="sdxl")
    keep_bytes = keep.read_bytes()
    steps = 12
    command = [
        sys.executable, "-m", "modules.lora_training", "--app-config", str(config), "train",
        "--project", name, "--base-model", DEMO_SDXL_NAME, "--steps", str(steps), "--rank", "4",
        "--save-every-steps", "1", "--keep-checkpoints", "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    trigger, delay = kill_after.split("+")
    seen_checkpoints = 0
    for line in process.stdout:
        if line.startswith("checkpoint saved"):
            seen_checkpoints += 1
        fire = (trigger == "checkpoint" and seen_checkpoints == 3) or (
            trigger == "final" and line.startswith(f"step {steps}/{steps}")
        )
        if fire:
            time.sleep(float(delay))
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the process was killed mid-run"

    checkpoints = latest_run(ProjectPaths.for_project(tmp_path / "projects", name)).checkpoints
    _assert_everything_loads(loras, checkpoints)
    assert keep.read_bytes() == keep_bytes, "an existing LoRA is never touched"
    if not (loras / f"{name}.safetensors").exists():
        assert interrupted_projects(tmp_path / "projects", loras) == [name], "a restarted app offers Resume"


def test_a_failed_write_names_the_path_and_leaves_nothing_half_written(sdxl_project, models_dir, tmp_path, monkeypatch):
    projects, name = sdxl_project
    shutil.copytree(projects, tmp_path / "projects")
    loras = tmp_path / "loras"
    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if str(loras) in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    real_stream = safetensors_stream.write_safetensors_to

    def full_disk_streamed(path, specs, *, metadata=None):
        if str(loras) in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_stream(path, specs, metadata=metadata)

    monkeypatch.setattr(safetensors_stream, "write_safetensors_to", full_disk_streamed)
    events = []
    config = config_from_dict(TrainConfig, {"project": name, "base_model": DEMO_SDXL_NAME, "steps": 3, "rank": 4})
    result = train(
        config, projects_dir=tmp_path / "projects", models_dir=models_dir, loras_dir=loras, on_event=events.append
    )
    assert result.status == "failed"
    message = next(e.message for e in events if isinstance(e, Failed))
    assert "No space left on device" in message and str(loras) in message and "MiB free" in message
    assert [p.name for p in loras.iterdir()] == [], "no partial file in loras/"
    run = latest_run(ProjectPaths.for_project(tmp_path / "projects", name))
    assert load_checkpoint(latest_checkpoint(run.checkpoints)).step == 3


def test_listen_without_auth_is_refused(tmp_path, models_dir):
    config = write_config(tmp_path, models_dir)
    done = subprocess.run(
        [sys.executable, "app.py", "--config", str(config), "--listen"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and "--auth" in done.stdout


def _fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_files_outside_the_app_folders_cannot_be_read(tmp_path, models_dir):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    (tmp_path / "app").mkdir()
    config = write_config(tmp_path / "app", models_dir)
    with running_app(config, tmp_path / "app.log") as url:
        from gradio_client import Client

        # Control: a file the app did produce is served through the same URL form.
        produced, _ = Client(url, verbose=False).predict(
            DEMO_SDXL_NAME, "a cat", "", 2, 5.0, 64, 64, 1, *(None, 1.0) * 4, api_name="/generate"
        )
        status, body = _fetch(f"{url}gradio_api/file={produced}")
        assert status == 200 and body.startswith(b"\x89PNG")
        for prefix in ("gradio_api/file=", "file=", "gradio_api/file=../../", "file=/"):
            for target in (str(secret), str(ROOT / "config.json"), "/etc/passwd"):
                status, body = _fetch(f"{url}{prefix}{target}")
                assert b"TOP-SECRET" not in body and b"root:" not in body and b"MODELS_DIR" not in body, (
                    prefix,
                    target,
                    status,
                )


def test_failed_logins_are_rate_limited_per_client(tmp_path, models_dir):
    import urllib.parse

    config = write_config(tmp_path, models_dir)

    def login(url: str, password: str) -> int:
        data = urllib.parse.urlencode({"username": "me", "password": password}).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "login", data=data), timeout=30) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code

    with running_app(config, tmp_path / "app.log", "--auth", "me:right-password") as url:
        assert [login(url, "wrong") for _ in range(5)] == [400] * 5
        assert login(url, "wrong") == 429
        assert login(url, "right-password") == 429, "no more tries from this address for a while"
