"""Evaluate a run after the fact: the validation figures of each of its checkpoints (or of a LoRA file),
measured as training measured them (:mod:`.validation`), so a re-evaluation gives the same numbers.

``evaluate_run`` rewrites the run's ``evaluation.json`` and returns it; the CLI prints it as a table
(``python -m modules.lora_training evaluate --project P [--run R] [--lora FILE]``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from core.errors import UserError
from modules.lora_training import checkpoints as ckpt
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.project import ProjectPaths, read_json
from modules.lora_training.runs import RunPaths, list_runs
from modules.lora_training.validation import Evaluation, fixed_noise_loss, split_validation, training_probe


def find_run(paths: ProjectPaths, run_id: str | None) -> RunPaths:
    """The named run of the project, or its newest one."""
    runs = [run for run in list_runs(paths) if run.training_config.is_file()]
    if not runs:
        raise UserError(f"Project {paths.name!r} has no training run to evaluate; train it first.")
    if run_id is None:
        return runs[-1]
    for run in runs:
        if run.run_id == run_id:
            return run
    raise UserError(
        f"Project {paths.name!r} has no run {run_id!r} (runs: {', '.join(r.run_id for r in runs)}); pick one of those."
    )


def run_config(run: RunPaths) -> TrainConfig:
    # Runs from before validation trained on every image: they are measured on none held out.
    return config_from_dict(TrainConfig, {"validation_share": 0.0, **(read_json(run.training_config) or {})})


class RunModel:
    """A run's base model on ``device`` in the run's precision (and, once asked, its LoRA layers): measures the
    fixed-noise loss of image sets as training does, and is what a checkpoint is loaded into to be saved."""

    def __init__(self, config: TrainConfig, *, models_dir: Path, device: str) -> None:
        from core.model_files import model_entry
        from families import family as model_family
        from modules.lora_training.train import choose_precision

        self.config = config
        entry = model_entry(models_dir, config.base_model)
        self.precision = choose_precision(config.mixed_precision, device, family=entry.family)
        self.family = model_family(entry.family)(
            entry, models_dir=models_dir, device=device, weight_dtype=self.precision.weight_dtype
        )
        self.family.configure(config)
        self.family.vae.to(device)
        for encoder in self.family.text_encoders():
            encoder.to(device)
        self.family.place_denoiser()
        self.device = device

    def add_lora_layers(self) -> None:
        """The run's LoRA layers, as a no-op until a checkpoint's weights are loaded into them."""
        config = self.config
        self.family.add_lora(
            rank=config.rank,
            alpha=config.alpha,
            targets=config.lora_targets,
            train_text_encoder=config.train_text_encoder,
        )
        self.family.denoiser.eval()

    def _inputs(self, item) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from modules.lora_training.train import _load_pixels

        mean, _ = self.family.encode_image_moments(_load_pixels(item, flip=False)[None]).chunk(2, dim=1)
        return mean.to(self.device), self.family.encode_text([item.caption])

    def loss(self, items: list, should_stop: Callable[[], bool] = lambda: False) -> float | None:
        autocast = self.precision.autocast_dtype
        device_type = torch.device(self.device).type
        with torch.autocast(device_type, dtype=autocast) if autocast else torch.autocast(device_type, enabled=False):
            return fixed_noise_loss(
                self.family, items, inputs=self._inputs, config=self.config, should_stop=should_stop
            )


def denoising_loss(
    config: TrainConfig, *, projects_dir: Path, models_dir: Path, lora_path: Path | None = None, device: str = "cpu"
) -> float:
    """The fixed-noise loss on every prepared image of ``config.project``, of the base model or of the base
    with the LoRA file ``lora_path`` loaded by diffusers' own loader (what other apps would apply)."""
    measurer = RunModel(config, models_dir=Path(models_dir), device=device)
    if lora_path is not None:
        measurer.family.pipe.load_lora_weights(str(lora_path))
    from modules.lora_training.data import load_items

    return measurer.loss(load_items(ProjectPaths.for_project(projects_dir, config.project)))


def evaluate_run(
    project: str,
    *,
    projects_dir: Path,
    models_dir: Path,
    run_id: str | None = None,
    device: str = "auto",
    on_record: Callable[[dict], None] = lambda record: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Evaluation | None:
    """Measure the base model and every checkpoint of the run; rewrite and return its ``evaluation.json``.
    None when ``should_stop`` turned true on the way (the file is then left as it was)."""
    from core.model_manager import pick_device

    paths = ProjectPaths.for_project(projects_dir, project)
    run = find_run(paths, run_id)
    config = run_config(run)
    held_out, probe = _measured_images(paths, run=run, config=config)
    measurer = RunModel(config, models_dir=Path(models_dir), device=pick_device(device))
    measurer.add_lora_layers()
    # Figures of checkpoints pruned since they were measured stay as training recorded them.
    evaluation = Evaluation.read(run.evaluation, up_to_step=run.last_step())
    evaluation.validation_images = [item.image_path.name for item in held_out]
    evaluation.training_images = [item.image_path.name for item in probe]

    def measure(step: int, checkpoint: str | None) -> bool:
        figures = {"validation_loss": measurer.loss(held_out, should_stop), "training_images_loss": None}
        if figures["validation_loss"] is not None:
            figures["training_images_loss"] = measurer.loss(probe, should_stop)
        if None in figures.values():
            return False
        record = {"step": step, **figures, "checkpoint": checkpoint}
        on_record(record)
        evaluation.add(record)
        return True

    if not measure(0, None):  # the LoRA layers are a no-op yet: the base model's figures
        return None
    for folder in ckpt.list_checkpoints(run.checkpoints):
        state = ckpt.load_checkpoint(folder)
        measurer.family.load_lora_state_dict(state.lora)
        if not measure(state.step, folder.name):
            return None
    evaluation.write(run.evaluation)
    return evaluation


def _measured_images(paths: ProjectPaths, *, run: RunPaths, config: TrainConfig) -> tuple[list, list]:
    """The run's held-out images and as many training images, as training chose them."""
    from modules.lora_training.data import load_items

    items, held_out = split_validation(load_items(paths), config.validation_share)
    if not held_out:
        raise UserError(
            f"Run {run.run_id} of project {paths.name!r} held no images out (that needs 5 prepared images or more "
            "and validation_share above 0): there is nothing to validate on; train a new run."
        )
    return held_out, training_probe(items, count=len(held_out))


def evaluate_lora_file(
    project: str, lora_path: Path, *, projects_dir: Path, models_dir: Path, run_id: str | None = None, device="auto"
) -> dict[str, dict[str, float]]:
    """The base model's figures and those with the LoRA file applied by diffusers' own loader (what other
    apps apply), on the images the project's run held out: ``{"base": {...}, "lora": {...}}``."""
    from core.model_manager import pick_device
    from model_formats.safetensors_header import require_regular_file

    require_regular_file(Path(lora_path))
    paths = ProjectPaths.for_project(projects_dir, project)
    run = find_run(paths, run_id)
    config = run_config(run)
    held_out, probe = _measured_images(paths, run=run, config=config)
    measurer = RunModel(config, models_dir=Path(models_dir), device=pick_device(device))

    def figures() -> dict[str, float]:
        return {"validation_loss": measurer.loss(held_out), "training_images_loss": measurer.loss(probe)}

    base = figures()
    try:
        measurer.family.pipe.load_lora_weights(str(lora_path))
    except Exception as exc:  # noqa: BLE001 - whatever the loader raises, the file does not fit this model
        raise UserError(
            f"{Path(lora_path).name} does not load onto {config.base_model}, the base model of project "
            f"{paths.name!r} ({type(exc).__name__}); evaluate a LoRA trained for that model."
        ) from exc
    return {"base": base, "lora": figures()}


def format_table(evaluation: Evaluation) -> str:
    """The figures as the CLI prints them, the best checkpoint marked."""
    best = evaluation.best()
    lines = [f"{'step':>8}  {'held-out':>10}  {'training':>10}  checkpoint"]
    for record in sorted(evaluation.records, key=lambda r: r["step"]):
        mark = "  <- best" if best is not None and record["step"] == best["step"] else ""
        checkpoint = record.get("checkpoint") or ("(base model)" if record["step"] == 0 else "-")
        lines.append(
            f"{record['step']:>8}  {record['validation_loss']:>10.5f}  {record['training_images_loss']:>10.5f}  "
            f"{checkpoint}{mark}"
        )
    return "\n".join(lines)
