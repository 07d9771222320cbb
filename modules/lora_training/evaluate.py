"""Evaluate a run after the fact: for the base model and each kept checkpoint, the validation figures
measured as training measured them (:mod:`.validation`), the prompt panel rendered at one seed
(:mod:`.prompt_panel`) and, when a CLIP model is in ``models/clip/``, its CLIP figures
(:mod:`.panel_judge`). A re-evaluation gives the same numbers.

``evaluate_run`` rewrites the run's ``evaluation.json`` and its comparison grid and returns the
evaluation; the CLI prints it as a table
(``python -m modules.lora_training evaluate --project P [--run R] [--lora FILE]``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.adapter_files import load_lora_file
from core.errors import UserError
from modules.lora_training import checkpoints as ckpt
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.ema import load_output_weights
from modules.lora_training.project import ProjectPaths, read_json
from modules.lora_training.runs import RunPaths, list_runs
from modules.lora_training.validation import (
    DEFAULT_MARGIN,
    DEFAULT_RULE,
    Evaluation,
    fixed_noise_loss,
    split_validation,
    training_probe,
)


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


@dataclass(frozen=True)
class RunUnderTest:
    """What an evaluation of one run needs before any model is loaded."""

    paths: ProjectPaths
    run: RunPaths
    config: TrainConfig
    training: list  # the run's training images (prepared items), the held-out ones excluded
    held_out: list
    probe: list  # as many training images as are held out, measured beside them
    subject: str  # the trigger word (the project's name when it has none)
    size: tuple[int, int]  # width, height of panel images: the set's most common bucket

    @classmethod
    def open(cls, project: str, *, projects_dir: Path, run_id: str | None) -> RunUnderTest:
        from modules.lora_training.data import load_items
        from modules.lora_training.manifest import ProjectManifest

        paths = ProjectPaths.for_project(projects_dir, project)
        run = find_run(paths, run_id)
        config = run_config(run)
        items = load_items(paths)
        training, held_out = split_validation(items, config.validation_share)
        manifest = ProjectManifest.read(paths)
        return cls(
            paths=paths,
            run=run,
            config=config,
            training=training,
            held_out=held_out,
            probe=training_probe(training, count=len(held_out)),
            subject=(manifest.trigger if manifest else "") or paths.name,
            size=Counter(item.bucket for item in items).most_common(1)[0][0],
        )

    def require_held_out(self) -> None:
        if not self.held_out:
            raise UserError(
                f"Run {self.run.run_id} of project {self.paths.name!r} held no images out (that needs 5 prepared "
                "images or more and validation_share above 0): there is nothing to validate on; train a new run."
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
            network=config.network,
            factor=config.factor,
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
        load_lora_file(measurer.family.pipe, lora_path)
    from modules.lora_training.data import load_items

    return measurer.loss(load_items(ProjectPaths.for_project(projects_dir, config.project)))


def evaluate_run(
    project: str,
    *,
    projects_dir: Path,
    models_dir: Path,
    run_id: str | None = None,
    device: str = "auto",
    best_rule: str = DEFAULT_RULE,
    margin: float = DEFAULT_MARGIN,
    clip_model: str = "",
    on_record: Callable[[dict], None] = lambda record: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Evaluation | None:
    """Measure the base model and every checkpoint of the run; rewrite and return its ``evaluation.json``
    and comparison grid. None when ``should_stop`` turned true on the way (the files are then left as they
    were). ``best_rule`` / ``margin`` choose the best checkpoint (:data:`.validation.BEST_RULES`)."""
    from core.model_manager import pick_device
    from modules.lora_training.panel_judge import PanelJudge, load_scorer

    target = RunUnderTest.open(project, projects_dir=projects_dir, run_id=run_id)
    run = target.run
    # Figures of checkpoints pruned since they were measured stay as training recorded them.
    evaluation = Evaluation.read(run.evaluation, up_to_step=run.last_step())
    evaluation.choose(best_rule, margin)
    scorer = load_scorer(Path(models_dir), name=clip_model, device=pick_device(device))
    if evaluation.rule == "subject_similarity" and scorer is None:
        raise UserError(
            "The subject-similarity rule needs a CLIP model in models/clip/ (run ./run.sh once to build the demo "
            "one, or place a CLIP folder there); choose the validation-loss rule otherwise."
        )
    model = RunModel(target.config, models_dir=Path(models_dir), device=pick_device(device))
    model.add_lora_layers()
    judge = PanelJudge(model, target=target, scorer=scorer)
    evaluation.validation_images = [item.image_path.name for item in target.held_out]
    evaluation.training_images = [item.image_path.name for item in target.probe]
    rows = _measure_all(model, judge=judge, target=target, evaluation=evaluation, on_record=on_record, stop=should_stop)
    if rows is None:
        return None
    evaluation.clip = judge.describe()
    best = evaluation.best()
    if best is not None:  # the grid marks the best checkpoint's row
        rows = [(f"{label} · best" if label == f"step {best['step']}" else label, images) for label, images in rows]
    evaluation.grid = judge.save_grid(
        rows, path=run.grid("checkpoints"), title=f"{target.paths.name} · run {run.run_id}"
    )
    evaluation.write(run.evaluation)
    return evaluation


def _measure_all(model, *, judge, target: RunUnderTest, evaluation: Evaluation, on_record, stop) -> list | None:
    """Measure the base model (the LoRA layers are a no-op until a checkpoint is loaded), then each kept
    checkpoint; add each record to ``evaluation``. The grid's rows, or None when stopped."""
    rows = []
    checkpoints = [None, *ckpt.list_checkpoints(target.run.checkpoints)]
    for folder in checkpoints:
        step = 0
        if folder is not None:
            state = ckpt.load_checkpoint(folder)
            load_output_weights(model.family, state, model.config)  # what training measured: the saved weights
            step = state.step
        figures = _validation_figures(model, target=target, stop=stop)
        judged = judge.judge(step=step, should_stop=stop) if figures is not None else None
        if judged is None:
            return None
        images, clip_figures = judged
        record = {"step": step, **figures, **clip_figures, "checkpoint": folder.name if folder else None}
        on_record(record)
        evaluation.add(record)
        rows.append(("base model" if folder is None else f"step {step}", images))
    return rows


def _validation_figures(model, *, target: RunUnderTest, stop) -> dict | None:
    """Held-out and training-image losses (None figures when the run held no images out); None when stopped."""
    if not target.held_out:
        return {"validation_loss": None, "training_images_loss": None}
    validation = model.loss(target.held_out, stop)
    training = model.loss(target.probe, stop) if validation is not None else None
    return None if training is None else {"validation_loss": validation, "training_images_loss": training}


def evaluate_lora_file(
    project: str,
    lora_path: Path,
    *,
    projects_dir: Path,
    models_dir: Path,
    run_id: str | None = None,
    device="auto",
    clip_model: str = "",
) -> dict[str, dict[str, float]]:
    """The base model's figures and those with the LoRA file applied by diffusers' own loader (what other
    apps apply): the validation losses on the images the project's run held out (None without held-out
    images) and, with a CLIP model in models/clip/, the CLIP figures of the prompt panel:
    ``{"base": {...}, "lora": {...}}``."""
    from core.model_manager import pick_device
    from model_formats.safetensors_header import require_regular_file
    from modules.lora_training.panel_judge import PanelJudge, load_scorer

    require_regular_file(Path(lora_path))
    target = RunUnderTest.open(project, projects_dir=projects_dir, run_id=run_id)
    scorer = load_scorer(Path(models_dir), name=clip_model, device=pick_device(device))
    if not target.held_out and scorer is None:
        target.require_held_out()
    measurer = RunModel(target.config, models_dir=Path(models_dir), device=pick_device(device))
    judge = PanelJudge(measurer, target=target, scorer=scorer)

    def figures(step: int) -> dict[str, float]:
        losses = _validation_figures(measurer, target=target, stop=lambda: False)
        return {**losses, **(judge.judge(step=step, should_stop=lambda: False)[1] if scorer else {})}

    base = figures(0)
    try:
        load_lora_file(measurer.family.pipe, lora_path)
    except Exception as exc:  # noqa: BLE001 - whatever the loader raises, the file does not fit this model
        raise UserError(
            f"{Path(lora_path).name} does not load onto {target.config.base_model}, the base model of project "
            f"{target.paths.name!r} ({type(exc).__name__}); evaluate a LoRA trained for that model."
        ) from exc
    return {"base": base, "lora": figures(1)}


_COLUMNS = (
    ("validation_loss", "held-out", ".5f"),
    ("training_images_loss", "training", ".5f"),
    ("subject_similarity", "subject", "+.4f"),
    ("prompt_adherence", "prompts", ".4f"),
    ("aesthetic", "aesthetic", ".3f"),
)


def format_table(evaluation: Evaluation) -> str:
    """The figures as the CLI prints them (the columns that were measured), the best checkpoint marked."""
    best = evaluation.best()
    rows = []
    for record in sorted(evaluation.records, key=lambda r: r["step"]):
        mark = "  <- best" if best is not None and record["step"] == best["step"] else ""
        checkpoint = record.get("checkpoint") or ("(base model)" if record["step"] == 0 else "-")
        rows.append((str(record["step"]), record, f"{checkpoint}{mark}"))
    return figures_table(rows, first="step", last="checkpoint")


def figures_table(rows: list[tuple[str, dict, str]], *, first: str, last: str = "") -> str:
    """(label, figures, note) rows as aligned columns, one per figure that some row has."""
    columns = [c for c in _COLUMNS if any(figures.get(c[0]) is not None for _, figures, _ in rows)]
    width = max([len(first), 8, *(len(label) for label, _, _ in rows)])
    lines = ["  ".join([first.rjust(width), *(title.rjust(10) for _, title, _ in columns), last]).rstrip()]
    for label, figures, note in rows:
        cells = [(format(figures[key], style) if figures.get(key) is not None else "-") for key, _, style in columns]
        lines.append("  ".join([label.rjust(width), *(cell.rjust(10) for cell in cells), note]).rstrip())
    return "\n".join(lines)
