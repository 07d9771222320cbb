"""The comparison grid users otherwise build by hand with X/Y plots: one row per checkpoint (or per
LoRA weight), one column per panel prompt, every image at the same seed; saved as a labelled PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.atomic import atomic_path

CELL = 192  # pixels per image in the grid: small training resolutions are scaled up to stay legible
LABEL_WIDTH = 150
HEADER_HEIGHT = 44
ROW_KINDS = ("checkpoints", "weights")


def check_rows(rows) -> None:
    from core.errors import UserError

    if rows not in ROW_KINDS:
        raise UserError(f"rows must be one of {', '.join(ROW_KINDS)}; got {rows!r}"[:300])


def draw_grid(rows: list[tuple[str, list]], *, columns: list[str], title: str, cell: int = CELL):
    """A PIL image: ``title`` on top, ``columns`` as headers, then each (label, images) row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    width = LABEL_WIDTH + cell * len(columns)
    grid = Image.new("RGB", (width, HEADER_HEIGHT + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((6, 4), _fit(draw, title, font=font, width=width - 12), fill="black", font=font)
    for index, text in enumerate(columns):
        left = LABEL_WIDTH + index * cell
        draw.text((left + 4, 24), _fit(draw, text, font=font, width=cell - 8), fill="black", font=font)
    for row, (label, images) in enumerate(rows):
        top = HEADER_HEIGHT + row * cell
        draw.text(
            (6, top + cell // 2 - 8), _fit(draw, label, font=font, width=LABEL_WIDTH - 12), fill="black", font=font
        )
        for index, image in enumerate(images):
            grid.paste(_fitted_cell(image, cell), (LABEL_WIDTH + index * cell, top))
    return grid


def _fit(draw, text: str, *, font, width: int) -> str:
    """``text`` cut with an ellipsis to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _fitted_cell(image, cell: int):
    from PIL import Image

    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Nearest keeps tiny training images' pixels sharp when scaled up; larger ones scale down smoothly.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    framed = Image.new("RGB", (cell, cell), "white")
    framed.paste(image.convert("RGB").resize(size, resample), ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return framed


def save_grid(grid, path: Path, *, description: dict) -> Path:
    """Write the grid PNG atomically, with what it shows (rows, prompts, seed) in its text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("lora_studio.comparison_grid", json.dumps(description))
    with atomic_path(Path(path)) as tmp:
        grid.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def comparison_grid(
    project: str,
    *,
    projects_dir: Path,
    models_dir: Path,
    run_id: str | None = None,
    rows: str = "checkpoints",
    device: str = "auto",
    should_stop=lambda: False,
) -> Path | None:
    """Render and save the run's grid: rows = the base model and each kept checkpoint, or
    ("weights") the best checkpoint (the newest when none is chosen) at LoRA weights 0, 0.5, 0.75, 1.
    Its path in the run's folder; None when ``should_stop`` turned true on the way."""
    from core.errors import UserError
    from core.model_manager import pick_device
    from modules.lora_training import checkpoints as ckpt
    from modules.lora_training.ema import load_output_weights
    from modules.lora_training.evaluate import RunModel, RunUnderTest
    from modules.lora_training.panel_judge import PanelJudge
    from modules.lora_training.prompt_panel import GRID_WEIGHTS, lora_weight
    from modules.lora_training.validation import Evaluation

    check_rows(rows)
    target = RunUnderTest.open(project, projects_dir=projects_dir, run_id=run_id)
    run = target.run
    kept = ckpt.list_checkpoints(run.checkpoints)
    if not kept:
        raise UserError(f"Run {run.run_id} of project {project!r} has no checkpoint yet; train it first.")
    model = RunModel(target.config, models_dir=Path(models_dir), device=pick_device(device))
    model.add_lora_layers()
    judge = PanelJudge(model, target=target, scorer=None)
    if rows == "checkpoints":
        plan = [("base model", None, 1.0)] + [(f"step {_step_of(f)}", f, 1.0) for f in kept]
    else:
        best = Evaluation.read(run.evaluation, up_to_step=run.last_step()).best()
        folder = ckpt.checkpoint_dir(run.checkpoints, best["step"]) if best else kept[-1]
        folder = folder if (folder / "state.json").is_file() else kept[-1]
        plan = [(f"weight {weight:g} · step {_step_of(folder)}", folder, weight) for weight in GRID_WEIGHTS]
    rendered = []
    for label, folder, weight in plan:
        if folder is not None:
            load_output_weights(model.family, ckpt.load_checkpoint(folder), model.config)
        with lora_weight(list(model.family.lora_modules().values()), weight):
            judged = judge.judge(step=0, should_stop=should_stop)
        if judged is None:
            return None
        rendered.append((label, judged[0]))
    judge.save_grid(rendered, path=run.grid(rows), title=f"{project} · run {run.run_id}")
    return run.grid(rows)


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[-1])
