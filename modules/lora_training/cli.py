"""Command line: ``python -m modules.lora_training prepare|...`` (no Gradio involved)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

from core.errors import UserError
from modules.lora_training.comparison_grid import ROW_KINDS
from modules.lora_training.config import PrepareConfig, TrainConfig, config_from_dict
from modules.lora_training.events import (
    CheckpointSaved,
    Failed,
    Finished,
    Log,
    PrepProgress,
    SampleSaved,
    StepDone,
    Stopped,
    Validated,
)
from modules.lora_training.export import FORMATS
from modules.lora_training.queue_cli import add_queue_parser, run_queue
from modules.lora_training.sweep_cli import add_sweep_parser, run_sweep_command
from modules.lora_training.validation import BEST_RULES, DEFAULT_MARGIN, DEFAULT_RULE

ROOT = Path(__file__).resolve().parents[2]


def _add_config_flags(parser: argparse.ArgumentParser, cls, *, renames: dict[str, str]) -> None:
    """One ``--flag`` per config field (``--no-flag`` for booleans), help from field metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + renames.get(f.name, f.name).replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is tuple:
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, help=help_text)
            continue
        parser.add_argument(flag, dest=f.name, type=kind if kind in (int, float) else str, default=None, help=help_text)


def _collect(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


def _print_event(event) -> None:
    if isinstance(event, PrepProgress):
        if event.total and (event.done == event.total or event.done % 10 == 0):
            print(f"[{event.stage}] {event.done}/{event.total} {event.item}", file=sys.stderr)
    elif isinstance(event, StepDone):
        if event.step == event.total_steps or event.step % 10 == 0 or event.step == 1:
            print(
                f"step {event.step}/{event.total_steps} epoch {event.epoch} loss {event.loss:.4f} "
                f"lr {event.lr:.2e} {event.s_per_step:.2f} s/step"
            )
    elif isinstance(event, Validated):
        print(event.describe())
    elif isinstance(event, CheckpointSaved):
        print(f"checkpoint saved: {event.path}")
    elif isinstance(event, SampleSaved):
        print(f"sample saved: {event.path}")
    elif isinstance(event, Stopped):
        run_id = Path(event.checkpoint_path).parent.parent.name
        print(f"stopped at step {event.step}; continue it with --resume --run {run_id} ({event.checkpoint_path})")
    elif isinstance(event, Finished):
        print(f"LoRA saved: {event.lora_path}")
    elif isinstance(event, Failed):
        print(f"failed: {event.message}", file=sys.stderr)
    elif isinstance(event, Log):
        print(event.message)


def _train_options(args: argparse.Namespace) -> dict:
    """Options from --config run.json, overridden by flags given on the command line."""
    options = {}
    if args.run_config:
        import json

        try:
            options = json.loads(Path(args.run_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {args.run_config}: {exc}") from exc
        if not isinstance(options, dict):
            raise UserError(f"{args.run_config} must hold a JSON object of training options")
    options.update(_collect(args, TrainConfig))
    return options


def _app_config(path: Path):
    from core.config import load_config

    return load_config(path)


def _print_estimates(config: TrainConfig, resolution: int | None, app_config) -> None:
    from modules.lora_training.estimate import estimate_run
    from modules.lora_training.manifest import resolution_of
    from modules.lora_training.project import ProjectPaths

    if resolution is None:
        resolution = resolution_of(ProjectPaths.for_project(app_config.LORA_PROJECTS_DIR, config.project))
    print(f"{config.base_model} at {resolution}², batch {config.batch_size}, rank {config.rank}:")
    print(estimate_run(config, models_dir=app_config.MODELS_DIR, resolution=resolution).describe())


def export_target(source: Path, fmt: str, out: str | None, *, overwrite: bool) -> Path:
    """Where ``export`` writes: ``--out`` as a file, or inside it when it is a folder (the source's file name);
    refused when the file exists (without ``overwrite``) or when a folder named by ``--out`` is missing."""
    from modules.lora_training.export import default_export_path

    if out is None:
        target = default_export_path(source, fmt)  # its folder is created on demand
    elif Path(out).is_dir():
        target = Path(out) / Path(source).name
    elif out.endswith(("/", os.sep)):
        raise UserError(f"--out folder {out} does not exist; create it first or choose another --out.")
    else:
        target = Path(out)
        if not target.parent.is_dir():
            raise UserError(
                f"--out {out}: folder {target.parent} does not exist; create it first or choose another --out."
            )
    if os.path.lexists(target) and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it, or choose another --out.")
    return target


def _export(args: argparse.Namespace) -> int:
    from modules.lora_training.export import export_lora

    target = export_target(args.lora, args.fmt, args.out, overwrite=args.overwrite)
    try:
        result = export_lora(args.lora, fmt=args.fmt, out=target)
    except OSError as exc:
        raise UserError(f"cannot export {args.lora} to {target}: {exc.strerror or exc}") from exc
    check = result.verification
    print(
        f"Wrote {result.path} ({result.format}); verified {check.layers} layers through diffusers' loader, "
        f"max weight difference {check.max_difference:.3g} ({check.relative:.3%} of the largest change)"
    )
    return 0


def _evaluate(args: argparse.Namespace, app_config) -> int:
    from modules.lora_training.evaluate import evaluate_run, format_table

    def progress(record: dict) -> None:
        print(f"measured step {record['step']}", flush=True)

    if args.lora is not None:
        return _evaluate_file(args, app_config)
    evaluation = evaluate_run(
        args.project,
        projects_dir=app_config.LORA_PROJECTS_DIR,
        models_dir=app_config.MODELS_DIR,
        run_id=args.run_id,
        device=args.device,
        best_rule=args.best_rule,
        margin=args.margin,
        clip_model=args.clip_model,
        on_record=progress,
    )
    print(format_table(evaluation))
    best = evaluation.best()
    print(f"best checkpoint ({BEST_RULES[evaluation.rule]}): {best['checkpoint'] if best else 'none yet'}")
    if evaluation.grid:
        print(f"comparison grid: {evaluation.grid} (in the run's folder)")
    return 0


def _evaluate_file(args: argparse.Namespace, app_config) -> int:
    from modules.lora_training.evaluate import evaluate_lora_file, figures_table

    figures = evaluate_lora_file(
        args.project,
        args.lora,
        projects_dir=app_config.LORA_PROJECTS_DIR,
        models_dir=app_config.MODELS_DIR,
        run_id=args.run_id,
        device=args.device,
        clip_model=args.clip_model,
    )
    print(figures_table([("base model", figures["base"], ""), (args.lora.name, figures["lora"], "")], first=""))
    return 0


def _save_checkpoint(args: argparse.Namespace, app_config) -> int:
    from modules.lora_training.checkpoint_lora import save_checkpoint_as_lora

    path = save_checkpoint_as_lora(
        args.project,
        projects_dir=app_config.LORA_PROJECTS_DIR,
        models_dir=app_config.MODELS_DIR,
        loras_dir=app_config.LORAS_DIR,
        name=args.name,
        run_id=args.run_id,
        step=args.step,
        overwrite=args.overwrite,
        webui_copy=not args.no_webui_copy,
    )
    print(f"Wrote {path}" + ("" if args.no_webui_copy else " and its webui copy"))
    return 0


def _caption_arguments(captions: argparse.ArgumentParser) -> None:
    captions.add_argument("--project", required=True)
    actions = captions.add_mutually_exclusive_group()
    actions.add_argument("--add", metavar="TAG", help="add a tag at the end of every caption that lacks it")
    actions.add_argument("--remove", metavar="TAG", help="remove a tag from every caption")
    actions.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"), help="replace a tag in every caption")
    actions.add_argument("--prefix", metavar="TEXT", help="put text after the trigger word of every caption")
    actions.add_argument("--suffix", metavar="TEXT", help="put text at the end of every caption")
    actions.add_argument("--search", metavar="TEXT", help="the captions containing the text")
    actions.add_argument("--undo", action="store_true", help="put the captions back as before the last change")


def _captions(args: argparse.Namespace, app_config) -> int:
    from modules.lora_training.caption_tools import run_caption_tool
    from modules.lora_training.project import ProjectPaths

    action, tag, replacement = "frequencies", "", ""
    if args.replace:
        action, (tag, replacement) = "replace", args.replace
    for name in ("add", "remove", "search"):
        if getattr(args, name) is not None:
            action, tag = name, getattr(args, name)
    for name in ("prefix", "suffix"):
        if getattr(args, name) is not None:
            action, replacement = name, getattr(args, name)
    if args.undo:
        action = "undo"
    paths = ProjectPaths.for_project(app_config.LORA_PROJECTS_DIR, args.project)
    result = run_caption_tool(paths, action=action, tag=tag, replacement=replacement)
    print(result.message)
    for image, caption in result.matches:
        print(f"  {image}: {caption}")
    if action != "search":
        print("\n".join(f"{count:>6}  {tag}" for tag, count in result.frequencies))
    return 0


def _run_arguments(command: argparse.ArgumentParser, *, run_help: str) -> None:
    command.add_argument("--project", required=True)
    command.add_argument("--run", dest="run_id", help=run_help)
    command.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _grid(args: argparse.Namespace, app_config) -> int:
    from modules.lora_training.comparison_grid import comparison_grid

    path = comparison_grid(
        args.project,
        projects_dir=app_config.LORA_PROJECTS_DIR,
        models_dir=app_config.MODELS_DIR,
        run_id=args.run_id,
        rows=args.rows,
        device=args.device,
    )
    print(f"Wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modules.lora_training", description="LoRA Studio training tools")
    parser.add_argument("--app-config", type=Path, default=ROOT / "config.json", help="the app's config.json")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="validate, crop and caption a folder of images")
    _add_config_flags(prepare, PrepareConfig, renames={"images_dir": "images"})
    train = commands.add_parser("train", help="train a LoRA on a prepared project")
    train.add_argument("--config", dest="run_config", type=Path, help="JSON file of training options")
    train.add_argument("--resume", action="store_true", help="continue the newest stopped run from its last checkpoint")
    train.add_argument("--run", dest="run_id", help="with --resume: the run to continue (its id, runs/<id>/)")
    train.add_argument(
        "--new-run", action="store_true", help="start a new run even though a stopped one could be resumed"
    )
    _add_config_flags(train, TrainConfig, renames={})
    estimate = commands.add_parser("estimate", help="peak memory and s/step that training with these options needs")
    estimate.add_argument("--config", dest="run_config", type=Path, help="JSON file of training options")
    estimate.add_argument(
        "--resolution", type=int, help="training resolution (default: the prepared project's, or 1024)"
    )
    _add_config_flags(estimate, TrainConfig, renames={})
    export = commands.add_parser("export", help="write a LoRA in kohya/webui or diffusers format, verified")
    export.add_argument("--lora", type=Path, required=True, help="the LoRA file to export")
    export.add_argument("--format", dest="fmt", choices=FORMATS, required=True)
    export.add_argument(
        "--out",
        help="output file, or an existing folder to write the source's file name into (default: loras/webui/ "
        "or loras/diffusers/ beside the source)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace the output file when it exists")
    evaluate = commands.add_parser(
        "evaluate",
        help="validation loss and CLIP figures of a run's checkpoints; best checkpoint; comparison grid",
    )
    _run_arguments(evaluate, run_help="the run to evaluate (its id, runs/<id>/; default: the newest)")
    evaluate.add_argument(
        "--lora", type=Path, help="measure this LoRA file (as diffusers applies it) against the base instead"
    )
    evaluate.add_argument(
        "--best-rule", default=DEFAULT_RULE, help=f"how the best checkpoint is chosen: {', '.join(BEST_RULES)}"
    )
    evaluate.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN, help="prompt adherence a checkpoint may lose (CLIP rule)"
    )
    evaluate.add_argument("--clip-model", default="", help="a folder name in models/clip/ (default: the first)")
    _caption_arguments(commands.add_parser("captions", help="tag counts; add, remove, replace, search, undo"))
    grid = commands.add_parser("grid", help="a labelled PNG: checkpoints (or LoRA weights) x the prompt panel")
    _run_arguments(grid, run_help="the run (its id, runs/<id>/; default: the newest)")
    grid.add_argument("--rows", choices=ROW_KINDS, default="checkpoints")
    save = commands.add_parser("save-checkpoint", help="write a run's checkpoint (default: the best) as a LoRA")
    save.add_argument("--project", required=True)
    save.add_argument("--name", required=True, help="the LoRA's name in loras/")
    save.add_argument("--run", dest="run_id", help="the run (its id, runs/<id>/; default: the newest)")
    save.add_argument("--step", type=int, help="the checkpoint's step (default: the best by validation)")
    save.add_argument("--overwrite", action="store_true", help="replace a LoRA of the same name")
    save.add_argument("--no-webui-copy", action="store_true", help="do not write loras/webui/<name>.safetensors")
    inspect = commands.add_parser("inspect", help="family, format, rank and alpha of a LoRA file")
    inspect.add_argument("file", type=Path)
    add_queue_parser(commands)
    add_sweep_parser(commands)
    return parser


def _prepare(args, app_config) -> None:
    from modules.lora_training.dataset.prepare import prepare
    from modules.lora_training.dataset.scan import ScanLimits

    prepare(
        config_from_dict(PrepareConfig, _collect(args, PrepareConfig)),
        projects_dir=app_config.LORA_PROJECTS_DIR,
        models_dir=app_config.MODELS_DIR,
        on_event=_print_event,
        limits=ScanLimits(max_image_bytes=app_config.MAX_IMAGE_FILE_MB * 2**20),
    )


def _inspect(args) -> int:
    from modules.lora_training.export import inspect_lora

    try:
        print(inspect_lora(args.file))
    except OSError as exc:
        raise UserError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        app_config = _app_config(args.app_config)
        if args.command == "prepare":
            _prepare(args, app_config)
        if args.command == "export":
            return _export(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "evaluate":
            return _evaluate(args, app_config)
        if args.command == "save-checkpoint":
            return _save_checkpoint(args, app_config)
        if args.command == "grid":
            return _grid(args, app_config)
        if args.command == "captions":
            return _captions(args, app_config)
        if args.command == "queue":
            return run_queue(args, app_config)
        if args.command == "sweep":
            return run_sweep_command(args, app_config, print_event=_print_event)
        if args.command == "estimate":
            _print_estimates(config_from_dict(TrainConfig, _train_options(args)), args.resolution, app_config)
            return 0
        if args.command == "train":
            from modules.lora_training.train import train

            config = config_from_dict(TrainConfig, _train_options(args))
            result = train(
                config,
                projects_dir=app_config.LORA_PROJECTS_DIR,
                models_dir=app_config.MODELS_DIR,
                loras_dir=app_config.LORAS_DIR,
                on_event=_print_event,
                resume=args.resume,
                run_id=args.run_id,
                new_run=args.new_run,
            )
            return 1 if result.status == "failed" else 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
