"""A kept checkpoint written out as a normal LoRA: the best one by validation, or any step the user picks.

The result is the same pair of files a finished run writes (the main file in ``loras/`` and its
verified kohya/webui copy), with the checkpoint's step and validation figures in the header.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from modules.lora_training import checkpoints as ckpt
from modules.lora_training.ema import load_output_weights
from modules.lora_training.evaluate import RunModel, find_run, run_config
from modules.lora_training.manifest import ProjectManifest
from modules.lora_training.names import validate_name
from modules.lora_training.project import ProjectPaths
from modules.lora_training.validation import BEST_RULES, Evaluation


def chosen_checkpoint(run, evaluation: Evaluation, step: int | None) -> tuple[Path, dict | None]:
    """The checkpoint folder of ``step`` (the best one when None) and its validation record, if any."""
    record = evaluation.best() if step is None else next((r for r in evaluation.records if r["step"] == step), None)
    if step is None and record is None:
        raise UserError(
            f"Run {run.run_id} has no best checkpoint yet by {BEST_RULES[evaluation.rule]} (held-out images need 5 "
            "prepared images or more; CLIP figures need an evaluation with a CLIP model); name a step instead."
        )
    folder = ckpt.checkpoint_dir(run.checkpoints, record["step"] if step is None else step)
    if not (folder / "state.json").is_file():
        kept = ", ".join(str(int(p.name.split("-")[1])) for p in ckpt.list_checkpoints(run.checkpoints)) or "none"
        raise UserError(f"Run {run.run_id} has no checkpoint at step {step} (kept steps: {kept}); pick one of those.")
    return folder, record


def save_checkpoint_as_lora(
    project: str,
    *,
    projects_dir: Path,
    models_dir: Path,
    loras_dir: Path,
    name: str,
    run_id: str | None = None,
    step: int | None = None,
    overwrite: bool = False,
    webui_copy: bool = True,
) -> Path:
    """Write the run's checkpoint at ``step`` (default: the best) as ``loras/<name>.safetensors``."""
    paths = ProjectPaths.for_project(projects_dir, project)
    target = Path(loras_dir) / f"{validate_name(name, what='LoRA name')}.safetensors"
    run = find_run(paths, run_id)
    if target.exists() and not overwrite:
        raise UserError(f"A LoRA named {target.name} already exists in {loras_dir}; choose another name or overwrite.")
    folder, record = chosen_checkpoint(run, Evaluation.read(run.evaluation, up_to_step=run.last_step()), step)
    state = ckpt.load_checkpoint(folder)
    config = run_config(run)
    model = RunModel(config, models_dir=Path(models_dir), device="cpu")  # weights are only copied, never run
    model.add_lora_layers()
    family = model.family
    weights = load_output_weights(family, state, config)  # the run's LoRA files may hold the average
    metadata = _metadata(
        family, config=config, run=run, paths=paths, step=state.step, record=record, ema=(weights, state.ema_updates)
    )
    family.save_lora(target, metadata=metadata)
    if webui_copy:
        from modules.lora_training.export import export_lora
        from modules.lora_training.lycoris_copy import pipeline_base_weights

        export_lora(target, fmt="kohya", base_weight=pipeline_base_weights(family.pipe))
    return target


def _metadata(
    family, *, config, run, paths: ProjectPaths, step: int, record: dict | None, ema: tuple[str, int]
) -> dict[str, str]:
    from modules.lora_training.data import load_items
    from modules.lora_training.train import lora_metadata, sha256_file

    manifest = ProjectManifest.read(paths) or ProjectManifest()
    metadata = lora_metadata(
        family=family,
        config=config,
        project=paths.name,
        run_id=run.run_id,
        base_model=family.entry.name,
        base_sha256=sha256_file(family.entry.path),
        resolution=manifest.resolution,
        step=step,
        trigger=manifest.trigger,
        captions=[item.caption for item in load_items(paths)],
        weights=ema[0],
        ema_updates=ema[1],
    )
    metadata["lora_studio.checkpoint_step"] = str(step)
    for key in ("validation_loss", "training_images_loss", "subject_similarity", "prompt_adherence", "aesthetic"):
        if record is not None and record.get(key) is not None:
            metadata[f"lora_studio.{key}"] = f"{record[key]:.6g}"
    return metadata
