"""Evaluation with CLIP figures, the best-checkpoint rules and the comparison grid, on a trained tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from modules.lora_training.comparison_grid import CELL, HEADER_HEIGHT, LABEL_WIDTH, comparison_grid
from modules.lora_training.evaluate import evaluate_run, format_table
from modules.lora_training.prompt_panel import GRID_WEIGHTS, PANEL
from modules.lora_training.validation import Evaluation
from tests.conftest import seven_image_copy, write_config
from tests.demo_names import DEMO_SDXL_NAME


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sdxl_project, models_dir):
    """A 7-image project trained 4 steps with a checkpoint every 2 (steps 2 and 4 kept)."""
    from modules.lora_training.config import TrainConfig, config_from_dict
    from modules.lora_training.train import train

    root = tmp_path_factory.mktemp("evaluation")
    projects, name = seven_image_copy(sdxl_project, root / "projects")
    values = {"project": name, "base_model": DEMO_SDXL_NAME, "rank": 4, "learning_rate": 3e-3, "seed": 5}
    values |= {"steps": 4, "save_every_steps": 2, "sample_every_steps": 0, "sample_steps": 2}
    config = config_from_dict(TrainConfig, {**values, "also_save_webui": False, "keep_checkpoints": 3})
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=root / "loras")
    assert result.status == "finished", result.message
    run = next((projects / name / "runs").iterdir())
    return projects, name, run


def _evaluate(trained, models_dir, **options):
    projects, name, _ = trained
    return evaluate_run(name, projects_dir=projects, models_dir=models_dir, device="cpu", **options)


def _cells(grid_path, *, rows: int, side: int = 64) -> list[list[Image.Image]]:
    """The images of a grid, back at their size (the tiny 64-px images are scaled up 3x, nearest)."""
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    assert grid.shape == (HEADER_HEIGHT + rows * CELL, LABEL_WIDTH + len(PANEL) * CELL, 3)
    scale = CELL // side
    cells = []
    for row in range(rows):
        top = HEADER_HEIGHT + row * CELL
        line = [grid[top : top + CELL, LABEL_WIDTH + i * CELL :][:CELL, :CELL][::scale, ::scale] for i in range(4)]
        cells.append([Image.fromarray(np.ascontiguousarray(cell)) for cell in line])
    return cells


@pytest.mark.slow
def test_clip_figures_are_those_of_the_grid_images_and_reproduce(trained, models_dir):
    from modules.lora_training.clip_scores import ClipScorer, find_clip_folder, prompt_adherence, subject_similarity
    from modules.lora_training.data import load_items
    from modules.lora_training.project import ProjectPaths
    from modules.lora_training.prompt_panel import panel_contexts
    from modules.lora_training.validation import split_validation

    projects, name, run = trained
    evaluation = _evaluate(trained, models_dir, best_rule="subject_similarity", margin=0.05)
    records = evaluation.records
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[0]["subject_similarity"] == 0.0, "the base model is the reference"
    assert evaluation.clip["model"] and evaluation.clip["prompts"] == [p.replace("{trigger}", "ohwx") for p in PANEL]

    # The figures are the CLIP figures of the very images the grid shows, computed here directly.
    scorer = ClipScorer.load(find_clip_folder(models_dir), device="cpu")
    training, _ = split_validation(load_items(ProjectPaths.for_project(projects, name)), 0.1)
    references = scorer.image_embeddings([Image.open(item.image_path) for item in training])
    contexts = scorer.text_embeddings(panel_contexts())
    rows = _cells(run / "comparison-checkpoints.png", rows=3)
    raw = [subject_similarity(scorer.image_embeddings(row), references) for row in rows]
    for record, images, subject in zip(records, rows, raw, strict=True):
        assert record["subject_similarity"] == pytest.approx(subject - raw[0], abs=1e-5)
        adherence = prompt_adherence(scorer.image_embeddings(images), contexts)
        assert record["prompt_adherence"] == pytest.approx(adherence, abs=1e-5)
    assert evaluation.clip["base_subject_similarity"] == pytest.approx(raw[0], abs=1e-5)

    # The rule: the highest subject similarity among checkpoints that keep prompt adherence within the margin.
    floor = records[0]["prompt_adherence"] - 0.05
    allowed = [r for r in records[1:] if r["prompt_adherence"] >= floor]
    written = json.loads((run / "evaluation.json").read_text())
    expected = max(allowed, key=lambda r: (r["subject_similarity"], r["step"])) if allowed else None
    assert written["best"] == expected and written["rule_id"] == "subject_similarity"
    assert "subject" in format_table(evaluation) and "prompts" in format_table(evaluation)

    again = _evaluate(trained, models_dir, best_rule="subject_similarity", margin=0.05)
    for before, after in zip(records, again.records, strict=True):
        for key in ("subject_similarity", "prompt_adherence", "validation_loss", "training_images_loss"):
            assert after[key] == pytest.approx(before[key], abs=1e-6), key


@pytest.mark.slow
def test_the_weights_grid_runs_from_the_base_to_the_full_lora(trained, models_dir):
    """Weight 0 draws what the base model draws, weight 1 what the checkpoint draws, at the same seed."""
    projects, name, run = trained
    evaluation = _evaluate(trained, models_dir)  # by validation loss
    best = evaluation.best()
    path = comparison_grid(name, projects_dir=projects, models_dir=models_dir, rows="weights", device="cpu")
    assert path == run / "comparison-weights.png"
    described = json.loads(Image.open(path).text["lora_studio.comparison_grid"])
    assert described["rows"] == [f"weight {w:g} · step {best['step']}" for w in GRID_WEIGHTS]
    weights = _cells(path, rows=len(GRID_WEIGHTS))
    checkpoints = _cells(run / "comparison-checkpoints.png", rows=3)
    by_step = {0: checkpoints[0], 2: checkpoints[1], 4: checkpoints[2]}
    for drawn, expected in ((weights[0], by_step[0]), (weights[-1], by_step[best["step"]])):
        for left, right in zip(drawn, expected, strict=True):
            assert np.array_equal(np.asarray(left), np.asarray(right))
    assert not np.array_equal(np.asarray(weights[1][0]), np.asarray(weights[0][0])), "half a LoRA changes the image"
    with pytest.raises(UserError, match="rows must be one of checkpoints, weights"):
        comparison_grid(name, projects_dir=projects, models_dir=models_dir, rows="prompts", device="cpu")


@pytest.mark.slow
def test_a_stopped_evaluation_leaves_the_files_as_they_were(trained, models_dir):
    _, _, run = trained
    _evaluate(trained, models_dir)
    before = (run / "evaluation.json").read_bytes()
    calls = []

    def stop_after_a_few() -> bool:
        calls.append(1)
        return len(calls) > 3

    assert _evaluate(trained, models_dir, best_rule="subject_similarity", should_stop=stop_after_a_few) is None
    assert (run / "evaluation.json").read_bytes() == before


@pytest.mark.slow
def test_the_best_by_clip_is_saved_with_its_figures(trained, models_dir, tmp_path):
    from safetensors import safe_open

    from modules.lora_training.checkpoint_lora import save_checkpoint_as_lora

    projects, name, _ = trained
    evaluation = _evaluate(trained, models_dir, best_rule="subject_similarity", margin=1.0)
    best = evaluation.best()
    assert best is not None, "with a margin of 1 every checkpoint qualifies"
    target = save_checkpoint_as_lora(
        name, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path, name="by-clip", webui_copy=False
    )
    with safe_open(str(target), "pt") as handle:
        header = handle.metadata()
    assert header["lora_studio.checkpoint_step"] == str(best["step"])
    assert float(header["lora_studio.subject_similarity"]) == pytest.approx(best["subject_similarity"], abs=1e-5)
    assert float(header["lora_studio.prompt_adherence"]) == pytest.approx(best["prompt_adherence"], abs=1e-5)

    # The file, applied by diffusers' own loader, scores as its checkpoint did (its weights are stored in half
    # precision: close, not equal).
    from modules.lora_training.evaluate import evaluate_lora_file

    figures = evaluate_lora_file(name, target, projects_dir=projects, models_dir=models_dir, device="cpu")
    assert figures["base"]["subject_similarity"] == 0.0
    for key in ("subject_similarity", "prompt_adherence"):
        assert figures["lora"][key] == pytest.approx(best[key], abs=2e-3), key


def test_best_rules_and_their_bounds():
    base = {"step": 0, "checkpoint": None, "validation_loss": 0.5, "subject_similarity": 0.0, "prompt_adherence": 0.3}
    records = [
        base,
        {"step": 2, "checkpoint": "step-000002", "validation_loss": 0.2, "subject_similarity": 0.1},
        {"step": 4, "checkpoint": "step-000004", "validation_loss": 0.3, "subject_similarity": 0.3},
        {"step": 6, "checkpoint": "step-000006", "validation_loss": 0.4, "subject_similarity": 0.2},
    ]
    for record, adherence in zip(records[1:], (0.29, 0.2, 0.28), strict=True):
        record["prompt_adherence"] = adherence
    evaluation = Evaluation(records=records, clip={"base_prompt_adherence": 0.3})
    assert evaluation.best()["step"] == 2, "lowest validation loss"
    evaluation.choose("subject_similarity", 0.05)
    assert evaluation.best()["step"] == 6, "step 4 lost too much prompt adherence"
    evaluation.choose("subject_similarity", 0.2)
    assert evaluation.best()["step"] == 4
    evaluation.choose("subject_similarity", 0.0)
    assert evaluation.best() is None, "no checkpoint keeps the base model's adherence"
    for rule, margin in (("best", 0.1), ("subject_similarity", float("nan")), ("validation_loss", -1), ("x", True)):
        with pytest.raises(UserError, match="best rule must be one of validation_loss, subject_similarity"):
            evaluation.choose(rule, margin)


@pytest.mark.slow
def test_evaluate_and_grid_jobs_through_the_cli_and_the_jobs(trained, models_dir, capsys, tmp_path):
    from core.config import load_config
    from core.model_manager import ModelManager
    from modules.lora_training.cli import main
    from modules.lora_training.jobs import TrainingJobs

    projects, name, run = trained
    app_config = write_config(tmp_path, models_dir, LORA_PROJECTS_DIR=str(projects))
    argv = ["--app-config", str(app_config), "evaluate", "--project", name, "--device", "cpu"]
    assert main([*argv, "--best-rule", "subject_similarity", "--margin", "1"]) == 0
    printed = capsys.readouterr().out
    assert "subject" in printed and "best checkpoint (highest CLIP subject similarity" in printed
    assert "comparison grid: comparison-checkpoints.png" in printed
    assert main([*argv, "--best-rule", "nope"]) == 2
    assert "best rule must be one of validation_loss, subject_similarity" in capsys.readouterr().err
    grid = ["--app-config", str(app_config), "grid", "--project", name, "--rows", "weights", "--device", "cpu"]
    assert main(grid) == 0 and f"Wrote {run / 'comparison-weights.png'}" in capsys.readouterr().out

    config = load_config(app_config)
    jobs = TrainingJobs(
        model_manager=ModelManager(models_dir=config.MODELS_DIR, loras_dir=config.LORAS_DIR, device="cpu"),
        app_config=config,
    )
    with pytest.raises(UserError, match="rows must be one of"):
        jobs.comparison_grid(name, rows="../x")
    with pytest.raises(UserError, match="best rule must be one of"):
        jobs.evaluate(name, best_rule="subject_similarity", margin=float("inf"))
    assert jobs.comparison_grid(name, rows="checkpoints")["kind"] == "grid"
    status = jobs.wait(timeout=120)
    assert status["state"] == "evaluated" and status["grid"] == str(run / "comparison-checkpoints.png"), status
    jobs.evaluate(name, best_rule="subject_similarity", margin=1.0)
    status = jobs.wait(timeout=120)
    assert status["step"] == status["total_steps"] == 3, "the base and the two checkpoints, measured"
    assert status["state"] == "evaluated" and status["grid"] == str(run / "comparison-checkpoints.png"), status
    assert any("CLIP at step 2: subject" in line for line in status["log"]), status["log"]
