"""Training runs have identities: each keeps its own checkpoints, and Resume continues one named run."""

import dataclasses
import os
import shutil

import pytest
from safetensors import safe_open

from core.errors import UserError
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import Log, StepDone
from modules.lora_training.jobs import resumable_config
from modules.lora_training.project import ProjectPaths
from modules.lora_training.runs import LEGACY_RUN_ID, latest_run, list_runs
from modules.lora_training.train import train
from tests.demo_names import DEMO_SDXL_NAME


def _config(project_name, **options):
    values = {"project": project_name, "base_model": DEMO_SDXL_NAME, "steps": 6, "rank": 4, "alpha": 4.0}
    values.update(options)
    return config_from_dict(TrainConfig, values)


def _stopped_run(project, models_dir, loras, *, stop_at, new_run=False, **options):
    """A run stopped after ``stop_at`` steps; returns its RunPaths."""
    projects, name = project
    done = {"step": 0}

    def on_event(event):
        if isinstance(event, StepDone):
            done["step"] = event.step

    result = train(
        _config(name, save_every_steps=1, keep_checkpoints=2, **options),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras,
        on_event=on_event,
        should_stop=lambda: done["step"] >= stop_at,
        new_run=new_run,
    )
    assert result.status == "stopped" and result.step == stop_at
    return latest_run(ProjectPaths.for_project(projects, name))


def _resume(project, models_dir, loras, run_id=None):
    projects, name = project
    logs = []
    config = resumable_config(projects, name, run_id)
    result = train(
        config,
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras,
        on_event=lambda e: logs.append(e.message) if isinstance(e, Log) else None,
        resume=True,
        run_id=run_id,
    )
    assert result.status == "finished" and result.step == 6
    with safe_open(str(result.lora_path), framework="pt") as handle:
        return logs, handle.metadata()


def _steps(run):
    return sorted(p.name for p in run.checkpoints.iterdir())


def test_runs_keep_their_checkpoints_and_resume_by_id(project, models_dir, tmp_path):
    loras = tmp_path / "loras"
    first = _stopped_run(project, models_dir, loras, stop_at=3, name="first")
    with pytest.raises(UserError, match=f"stopped run {first.run_id} at step 3: Resume it.*--new-run"):
        _stopped_run(project, models_dir, loras, stop_at=2, name="second", rank=8, alpha=8.0)

    second = _stopped_run(project, models_dir, loras, stop_at=2, new_run=True, name="second", rank=8, alpha=8.0)
    assert second.run_id > first.run_id
    assert _steps(second) == ["step-000001", "step-000002"], "pruning keeps the new run's own checkpoints"
    assert _steps(first) == ["step-000002", "step-000003"], "the old run is untouched"

    logs, metadata = _resume(project, models_dir, loras)
    assert f"Resuming run {second.run_id} from step 2" in "\n".join(logs)
    assert metadata["lora_studio.run_id"] == second.run_id and metadata["lora_studio.rank"] == "8"
    assert (second.root / "finished.json").is_file() and (second.logs / "metrics.jsonl").is_file()

    logs, metadata = _resume(project, models_dir, loras, run_id=first.run_id)
    assert f"Resuming run {first.run_id} from step 3" in "\n".join(logs)
    assert metadata["lora_studio.run_id"] == first.run_id and metadata["lora_studio.rank"] == "4"


def test_resume_takes_the_lora_shape_from_the_checkpoint(project, models_dir, tmp_path):
    projects, name = project
    run = _stopped_run(project, models_dir, tmp_path, stop_at=2, rank=8, alpha=8.0)
    result = train(
        _config(name, rank=4, alpha=4.0),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=tmp_path,
        resume=True,
        run_id=run.run_id,
    )
    with safe_open(str(result.lora_path), framework="pt") as handle:
        assert handle.metadata()["lora_studio.rank"] == "8"


def test_a_legacy_project_is_migrated_and_resumes(project, models_dir, tmp_path):
    projects, name = project
    run = _stopped_run(project, models_dir, tmp_path, stop_at=3)
    for item in ("checkpoints", "samples", "logs", "training_config.json"):
        if (run.root / item).exists():
            os.replace(run.root / item, projects / name / item)
    shutil.rmtree(projects / name / "runs")

    logs, metadata = _resume(project, models_dir, tmp_path)
    assert f"Resuming run {LEGACY_RUN_ID} from step 3" in "\n".join(logs)
    assert metadata["lora_studio.run_id"] == LEGACY_RUN_ID
    assert not (projects / name / "checkpoints").exists()
    assert [r.run_id for r in list_runs(ProjectPaths.for_project(projects, name))] == [LEGACY_RUN_ID]


def test_the_cli_refuses_a_new_run_and_resumes_a_named_one(project, models_dir, tmp_path, capsys):
    from modules.lora_training.cli import main
    from tests.conftest import write_config

    app_config = write_config(tmp_path, models_dir)
    first = _stopped_run(project, models_dir, tmp_path / "loras", stop_at=3, name="first")
    second = _stopped_run(project, models_dir, tmp_path / "loras", stop_at=2, new_run=True, name="second")
    base = ["--app-config", str(app_config), "train", "--project", project[1], "--base-model", DEMO_SDXL_NAME]
    assert main([*base, "--steps", "4", "--rank", "4"]) == 2
    assert f"stopped run {second.run_id} at step 2" in capsys.readouterr().err

    assert main([*base, "--steps", "6", "--rank", "4", "--name", "first", "--resume", "--run", first.run_id]) == 0
    assert f"Resuming run {first.run_id} from step 3" in capsys.readouterr().out
    assert main([*base, "--steps", "1", "--rank", "4", "--name", "third", "--new-run"]) == 0


def test_resume_never_replaces_the_lora_of_another_run(project, models_dir, tmp_path):
    """Run A stops; run B of the same project writes same.safetensors; resuming A must not replace B's LoRA."""
    projects, name = project
    loras = tmp_path / "loras"
    first = _stopped_run(project, models_dir, loras, stop_at=2, name="same")
    second = train(
        _config(name, name="same", steps=2), projects_dir=projects, models_dir=models_dir, loras_dir=loras, new_run=True
    )
    assert second.status == "finished"
    written = (loras / "same.safetensors").read_bytes()
    config = resumable_config(projects, name, first.run_id)
    with pytest.raises(UserError, match=r"same.safetensors already exists .*\(made by run \S+ of this project\)"):
        train(config, projects_dir=projects, models_dir=models_dir, loras_dir=loras, resume=True, run_id=first.run_id)
    assert (loras / "same.safetensors").read_bytes() == written
    overwrite = dataclasses.replace(config, overwrite=True)
    result = train(
        overwrite, projects_dir=projects, models_dir=models_dir, loras_dir=loras, resume=True, run_id=first.run_id
    )
    with safe_open(str(result.lora_path), framework="pt") as handle:
        assert handle.metadata()["lora_studio.run_id"] == first.run_id, "with overwrite on, the resumed run's LoRA"
