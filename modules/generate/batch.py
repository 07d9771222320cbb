"""Batch generation, the input side: a CSV or JSON file of rows → checked :class:`GenerationRequest` s.

Columns: prompt (required), negative, model, loras, seed, width, height, steps, guidance; every one but
prompt may be left out or empty and takes the Generate tab's default. LoRAs are ``"name:0.8;other:0.5"``
in CSV and a list of ``{"name", "weight"}`` in JSON (the string form is read there too). A row without a
seed (or with -1) gets ``base seed + row index`` (index 0 for the first row), recorded in the manifest.

Every value is checked before any work, like a single generation (the ModelManager's own checks), with
messages naming the row and the column; what depends on the model (it exists, its size multiple, the
LoRAs' family) is checked by ``ModelManager.generate`` when the row runs, and a row failing there is
recorded with its error while the others go on. No gradio import here.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.model_manager import (
    MAX_LORAS,
    GenerateLimits,
    GenerationRequest,
    LoraChoice,
    check_prompts,
    check_settings,
)
from core.regular_files import UnreadableFile, read_bounded
from modules.generate.tab import real_number, whole_number

MAX_BATCH_BYTES = 1_000_000
MAX_BATCH_ROWS = 500
COLUMNS = ("prompt", "negative", "model", "loras", "seed", "width", "height", "steps", "guidance")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class BatchDefaults:
    """What an empty cell means: the Generate tab's defaults (``size_for(model)`` gives the model's side)."""

    model: str | None
    size_for: Callable[[str], int]
    steps: int = 20
    guidance: float = 5.0
    limits: GenerateLimits = GenerateLimits()


def read_batch_file(path: str | Path) -> str:
    """The text of a batch file the user named: a regular file (checked before it is opened, so a named
    pipe cannot block the server) of at most MAX_BATCH_BYTES, in UTF-8."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UserError(f"The batch file cannot be read: {exc.strerror}.") from exc
    if not stat.S_ISREG(info.st_mode):
        raise UserError("The batch file is not a regular file: give a CSV or JSON file.")
    if info.st_size > MAX_BATCH_BYTES:
        raise UserError(f"The batch file is {info.st_size} bytes; at most {MAX_BATCH_BYTES} bytes are read.")
    try:
        data = read_bounded(path, max_bytes=MAX_BATCH_BYTES)
    except UnreadableFile as exc:
        if exc.too_large:  # it grew since the stat
            raise UserError(f"The batch file is over {MAX_BATCH_BYTES} bytes; split it into smaller batches.") from exc
        raise UserError("The batch file is not a regular file: give a CSV or JSON file.") from exc
    return decode_batch(data)


def decode_batch(data: bytes) -> str:
    if len(data) > MAX_BATCH_BYTES:
        raise UserError(f"The batch file is over {MAX_BATCH_BYTES} bytes; split it into smaller batches.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError("The batch file is not UTF-8 text: save it as UTF-8 CSV or JSON.") from exc


def parse_rows(text: str) -> list[dict]:
    """The rows of a batch (JSON when it starts with ``[`` or ``{``, CSV otherwise), as dicts of the raw
    cells; unknown columns, too many rows and an empty batch are refused."""
    if not isinstance(text, str):
        raise UserError(f"The batch must be the text of a CSV or JSON file (got {type(text).__name__}).")
    if len(text.encode("utf-8")) > MAX_BATCH_BYTES:
        raise UserError(f"The batch file is over {MAX_BATCH_BYTES} bytes; split it into smaller batches.")
    stripped = text.strip()
    rows = _json_rows(stripped) if stripped[:1] in ("[", "{") else _csv_rows(stripped)
    if not rows:
        raise UserError("The batch file holds no rows: one row per image, with at least a prompt column.")
    if len(rows) > MAX_BATCH_ROWS:
        raise UserError(f"The batch file has {len(rows)} rows; at most {MAX_BATCH_ROWS} rows per batch.")
    for number, row in enumerate(rows, start=1):
        unknown = sorted(str(key) for key in row if key not in COLUMNS)
        if unknown:
            raise UserError(
                f"Row {number}: unknown column {', '.join(unknown)}; the columns are {', '.join(COLUMNS)}."[:400]
            )
    return rows


def _json_rows(text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"The batch file is not valid JSON: {exc}.") from exc
    if isinstance(data, dict):
        data = data.get("rows")
    if not isinstance(data, list):
        raise UserError('A JSON batch is a list of rows (objects such as {"prompt": "..."}) or {"rows": [...]}.')
    for number, row in enumerate(data[: MAX_BATCH_ROWS + 1], start=1):
        if not isinstance(row, dict):
            raise UserError(f'Row {number} must be an object such as {{"prompt": "..."}} (got {row!r}).'[:400])
    return data


def _csv_rows(text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise UserError("The batch file holds no rows: one row per image, with at least a prompt column.")
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    rows = []
    try:
        for number, row in enumerate(reader, start=1):
            if None in row:
                raise UserError(f"Row {number} has more cells than the header has columns.")
            rows.append({key: value for key, value in row.items() if value not in (None, "")})
            if len(rows) > MAX_BATCH_ROWS:
                break
    except csv.Error as exc:
        raise UserError(f"The batch file is not valid CSV: {exc}.") from exc
    return rows


def parse_loras(value, *, row: int) -> tuple[LoraChoice, ...]:
    """``"name:0.8;other"`` or ``[{"name": ..., "weight": ...}]`` → LoRA choices (weight 1 when left out)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items = [part.strip() for part in value.split(";") if part.strip()]
        pairs = [item.rsplit(":", 1) if ":" in item else [item, 1.0] for item in items]
    elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
        for item in value:
            if set(item) - {"name", "weight"} or not isinstance(item.get("name"), str):
                raise UserError(f'Row {row}, column loras: each LoRA is {{"name": ..., "weight": ...}} (got {item!r}).')
        pairs = [[item["name"], item.get("weight", 1.0)] for item in value]
    else:
        raise UserError(f'Row {row}, column loras: write "name:0.8;other:0.5" or a list of {{"name", "weight"}}.')
    if len(pairs) > MAX_LORAS:
        raise UserError(f"Row {row}, column loras: at most {MAX_LORAS} LoRAs at once (got {len(pairs)}).")
    choices = []
    for slot, (name, weight) in enumerate(pairs, start=1):
        if isinstance(weight, bool):
            raise UserError(f"Row {row}, column loras: the weight of {name} must be a number (got {weight!r}).")
        label = f"weight of {name.strip()}"
        number = _cell(row, "loras", lambda label=label, weight=weight: real_number(label, weight))
        choices.append(LoraChoice(name=name.strip(), weight=number, slot=slot))
    return tuple(choices)


def _cell(row: int, column: str, read: Callable):
    """``read()``, its UserError prefixed with the row and the column."""
    try:
        return read()
    except UserError as exc:
        raise UserError(f"Row {row}, column {column}: {exc}") from exc


def _number(row: int, column: str, value, default, *, whole: bool = True):
    if value is None:
        return default
    if isinstance(value, bool):
        raise UserError(f"Row {row}, column {column}: must be a number (got {value!r}).")
    read = whole_number if whole else real_number
    return _cell(row, column, lambda: read(column, value))


def resolve_row(raw: dict, index: int, *, defaults: BatchDefaults, base_seed: int) -> GenerationRequest:
    """One row as a request, every empty cell filled from ``defaults``; checked like a single generation
    (the model-dependent checks aside: the model, its size multiple and limit, the LoRAs' family)."""
    row = index + 1
    for column in ("prompt", "negative", "model"):
        if raw.get(column) is not None and not isinstance(raw[column], str):
            raise UserError(f"Row {row}, column {column}: must be text (got {raw[column]!r}).")
    model = (raw.get("model") or "").strip() or defaults.model
    if not model:
        raise UserError(f"Row {row}, column model: no model given and no model in the models folder.")
    seed = _number(row, "seed", raw.get("seed"), -1)
    if seed == -1:
        seed = base_seed + index
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"Row {row}, column seed: use a whole number between 0 and {MAX_SEED} (got {seed!r}).")
    side = None if raw.get("width") is not None and raw.get("height") is not None else defaults.size_for(model)
    request = GenerationRequest(
        model=model,
        prompt=raw.get("prompt") or "",
        negative_prompt=raw.get("negative") or "",
        steps=_number(row, "steps", raw.get("steps"), defaults.steps),
        guidance=_number(row, "guidance", raw.get("guidance"), defaults.guidance, whole=False),
        width=_number(row, "width", raw.get("width"), side),
        height=_number(row, "height", raw.get("height"), side),
        seed=seed,
        loras=parse_loras(raw.get("loras"), row=row),
    )
    _cell(row, "prompt", lambda: check_prompts(request))
    column = _failing_setting(request, limits=defaults.limits)
    if column:
        _cell(row, column, lambda: check_settings(request, limits=defaults.limits))
    return request


def _failing_setting(request: GenerationRequest, *, limits: GenerateLimits) -> str | None:
    """The column whose value :func:`check_settings` refuses (None when all pass)."""
    import dataclasses

    good = GenerationRequest(model=request.model, prompt="x")
    for field, column in (("steps", "steps"), ("seed", "seed"), ("guidance", "guidance"), ("loras", "loras")):
        try:
            check_settings(dataclasses.replace(good, **{field: getattr(request, field)}), limits=limits)
        except UserError:
            return column
    return None


def parse_batch(text: str, *, defaults: BatchDefaults, base_seed: int) -> list[GenerationRequest]:
    """The whole batch checked, or a UserError naming the first bad row and column."""
    rows = parse_rows(text)
    return [resolve_row(raw, index, defaults=defaults, base_seed=base_seed) for index, raw in enumerate(rows)]
