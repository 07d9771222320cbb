"""Command line: ``python -m modules.lora_training prepare|...`` (no Gradio involved)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from core.errors import UserError
from modules.lora_training.config import PrepareConfig, config_from_dict
from modules.lora_training.events import Log, PrepProgress

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
        if typing.get_origin(kind) in (typing.Union, __import__("types").UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        parser.add_argument(flag, dest=f.name, type=kind if kind in (int, float) else str, default=None, help=help_text)


def _collect(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


def _print_event(event) -> None:
    if isinstance(event, PrepProgress):
        if event.total and (event.done == event.total or event.done % 10 == 0):
            print(f"[{event.stage}] {event.done}/{event.total} {event.item}", file=sys.stderr)
    elif isinstance(event, Log):
        print(event.message)


def _app_config(path: Path):
    from core.config import load_config

    return load_config(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modules.lora_training", description="LoRA Studio training tools")
    parser.add_argument("--app-config", type=Path, default=ROOT / "config.json", help="the app's config.json")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="validate, crop and caption a folder of images")
    _add_config_flags(prepare, PrepareConfig, renames={"images_dir": "images"})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        app_config = _app_config(args.app_config)
        if args.command == "prepare":
            from modules.lora_training.dataset.prepare import prepare

            config = config_from_dict(PrepareConfig, _collect(args, PrepareConfig))
            prepare(
                config,
                projects_dir=app_config.LORA_PROJECTS_DIR,
                models_dir=app_config.MODELS_DIR,
                on_event=_print_event,
            )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
