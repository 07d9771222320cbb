"""Caption tools for a prepared project: the tag frequency table, and add / remove / replace a tag, prefix or
suffix text across every caption, search, undo.

Captions are the comma-separated ``.txt`` files beside the prepared crops (``<project>/images/``), the ones
training reads; the source folder is never touched. Before each change every caption is kept in
``<project>/caption_history/`` (the newest :data:`HISTORY_LIMIT` changes), and ``undo`` puts the newest
snapshot back. The trigger word stays first: it cannot be removed or replaced here (Prepare sets it).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import write_text_atomic
from core.errors import UserError
from core.regular_files import UnreadableFile, read_json_bounded
from modules.lora_training.dataset.captions import join_tags, split_tags
from modules.lora_training.project import ProjectPaths

ACTIONS = ("frequencies", "add", "remove", "replace", "prefix", "suffix", "search", "undo")
HISTORY_LIMIT = 50
MAX_SNAPSHOT_BYTES = 64 * 2**20
_SNAPSHOT_NUMBER = re.compile(r"[0-9]{1,12}")  # ASCII: "²".isdigit() is true and int() refuses it
MAX_TAG = 200  # characters in a tag or a search
MAX_TEXT = 500  # characters of prefix or suffix text


@dataclass
class CaptionToolsResult:
    message: str
    changed: int = 0
    frequencies: list[tuple[str, int]] = field(default_factory=list)
    matches: list[tuple[str, str]] = field(default_factory=list)  # (image file name, caption)

    def as_dict(self) -> dict:
        return {
            "message": self.message,
            "changed": self.changed,
            "frequencies": [list(pair) for pair in self.frequencies],
            "matches": [list(pair) for pair in self.matches],
        }


@dataclass(frozen=True)
class _PreparedCaptions:
    """A project's captions as training reads them (the .txt file, else the manifest's), read once per action."""

    captions: dict[str, str]  # image file name -> caption
    files: dict[str, Path]  # image file name -> its caption file
    trigger: str

    @classmethod
    def read(cls, paths: ProjectPaths) -> _PreparedCaptions:
        from modules.lora_training.manifest import ProjectManifest

        manifest = ProjectManifest.read(paths)
        if manifest is None:
            raise UserError(f"Project {paths.name!r} has no prepared images: run Prepare first.")
        captions, files = {}, {}
        for image in manifest.prepared_images(paths):
            text_file = paths.images / image.caption_file
            text = text_file.read_text(encoding="utf-8") if _regular(text_file) else image.caption
            captions[image.image], files[image.image] = text.strip(), text_file
        return cls(captions, files, manifest.trigger)

    def write(self, changed: dict[str, str]) -> None:
        for image_name, text in changed.items():
            write_text_atomic(self.files[image_name], text + "\n")


def read_captions(paths: ProjectPaths) -> dict[str, str]:
    """Image file name -> its caption, as training reads it (the .txt file, else the manifest's)."""
    return _PreparedCaptions.read(paths).captions


def _regular(path: Path) -> bool:
    import stat

    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def tag_frequencies(captions: dict[str, str]) -> list[tuple[str, int]]:
    """Each tag with the number of captions holding it, most frequent first (then by name)."""
    counts = Counter(tag for caption in captions.values() for tag in dict.fromkeys(split_tags(caption)))
    return sorted(counts.items(), key=lambda pair: (-pair[1], pair[0].lower()))


def apply_action(caption: str, *, action: str, tag: str, replacement: str, trigger: str) -> str:
    """One caption after ``action`` (a pure function; the trigger, when first, stays first)."""
    tags = split_tags(caption)
    if action == "add":
        return caption if tag in tags else join_tags([*tags, tag])
    if action == "remove":
        return join_tags([t for t in tags if t != tag])
    if action == "replace":
        replaced = list(dict.fromkeys(replacement if t == tag else t for t in tags))
        return join_tags(replaced)
    rest = tags[1:] if trigger and tags[:1] == [trigger] else tags
    head = tags[: len(tags) - len(rest)]
    if action == "prefix":
        return join_tags([*head, replacement, *rest])
    if action == "suffix":
        return join_tags([*tags, replacement])
    raise UserError(f"action must be one of {', '.join(ACTIONS)}; got {action!r}"[:300])


def run_caption_tool(paths: ProjectPaths, *, action: str, tag: str = "", replacement: str = "") -> CaptionToolsResult:
    """Carry out ``action`` on every caption of the project; the frequencies after it come back with it."""
    if action not in ACTIONS:
        raise UserError(f"action must be one of {', '.join(ACTIONS)}; got {action!r}"[:300])
    prepared = _PreparedCaptions.read(paths)
    captions, trigger = prepared.captions, prepared.trigger
    if action == "frequencies":
        return CaptionToolsResult(f"{len(captions)} caption(s).", frequencies=tag_frequencies(captions))
    if action == "undo":
        return _undo(paths, prepared)
    if action == "search":
        needle = _checked(tag, what="search text", limit=MAX_TAG).lower()
        found = [(name, text) for name, text in captions.items() if needle in text.lower()]
        return CaptionToolsResult(f"{len(found)} caption(s) contain {tag!r}.", matches=found)
    tag, replacement = _checked_inputs(action, tag=tag, replacement=replacement, trigger=trigger)
    changed = {
        name: new
        for name, text in captions.items()
        if (new := apply_action(text, action=action, tag=tag, replacement=replacement, trigger=trigger)) != text
    }
    if changed:
        _snapshot(paths, captions, action=action)
        prepared.write(changed)
    after = {**captions, **changed}
    return CaptionToolsResult(
        f"{action}: {len(changed)} caption(s) changed.", changed=len(changed), frequencies=tag_frequencies(after)
    )


def _checked(text, *, what: str, limit: int, tag: bool = False) -> str:
    if not isinstance(text, str):
        raise UserError(f"{what} must be text; got {text!r}"[:300])
    text = text.strip()
    if tag and "," in text:
        raise UserError(f"{what} must be one tag, without commas; got {text[:60]!r}")
    if not text or len(text) > limit or any(c in text for c in "\r\n\x00"):
        raise UserError(f"{what} must be 1 to {limit} characters on one line; got {text[:60]!r}")
    return text


def _checked_inputs(action: str, *, tag: str, replacement: str, trigger: str) -> tuple[str, str]:
    if action in ("prefix", "suffix"):
        return "", _checked(replacement, what="text", limit=MAX_TEXT)
    tag = _checked(tag, what="tag", limit=MAX_TAG, tag=True)
    if action == "add":
        return tag, ""
    if trigger and tag == trigger:
        raise UserError(f"{trigger!r} is the trigger word; it stays in every caption (Prepare sets it).")
    if action == "replace":
        return tag, _checked(replacement, what="replacement tag", limit=MAX_TAG, tag=True)
    return tag, ""


def _history(paths: ProjectPaths) -> Path:
    return paths.root / "caption_history"


def _snapshot(paths: ProjectPaths, captions: dict[str, str], *, action: str) -> None:
    folder = _history(paths)
    folder.mkdir(exist_ok=True)
    snapshots = _snapshots(paths)
    number = int(snapshots[-1].stem) + 1 if snapshots else 1  # a counter: the newest sorts last, whatever the clock
    write_text_atomic(folder / f"{number:08d}.json", json.dumps({"action": action, "captions": captions}))
    for old in _snapshots(paths)[:-HISTORY_LIMIT]:
        old.unlink()


def _snapshots(paths: ProjectPaths) -> list[Path]:
    """The kept snapshots, oldest first."""
    folder = _history(paths)
    found = [path for path in folder.glob("*.json") if _SNAPSHOT_NUMBER.fullmatch(path.stem)] if folder.is_dir() else []
    return sorted(found, key=lambda path: int(path.stem))


def _read_snapshot(path: Path) -> dict:
    """A snapshot ``{"action": str, "captions": {image: caption}}``, checked before anything is written."""
    try:
        saved = read_json_bounded(path, max_bytes=MAX_SNAPSHOT_BYTES)
    except UnreadableFile as exc:
        saved, why = None, str(exc)
    else:
        why = "not a caption snapshot"
    captions = saved.get("captions") if isinstance(saved, dict) else None
    good = isinstance(captions, dict) and all(isinstance(t, str) for t in captions.values())
    if not good or not isinstance(saved.get("action"), str):
        raise UserError(
            f"Caption history file {path} cannot be used ({why}); delete it, then Undo goes back to the one before."
        )
    return saved


def _undo(paths: ProjectPaths, prepared: _PreparedCaptions) -> CaptionToolsResult:
    snapshots = _snapshots(paths)
    current = prepared.captions
    if not snapshots:
        return CaptionToolsResult("Nothing to undo.", frequencies=tag_frequencies(current))
    newest = snapshots[-1]
    saved = _read_snapshot(newest)
    restored = {name: text for name, text in saved["captions"].items() if name in current and current[name] != text}
    prepared.write(restored)
    newest.unlink()
    return CaptionToolsResult(
        f"Undid {saved['action']}: {len(restored)} caption(s) restored.",
        changed=len(restored),
        frequencies=tag_frequencies({**current, **restored}),
    )
