"""Captioning the images that need it: one captioner or two (``florence2+tags``), a per-image cache, fallbacks.

Each captioner the setting names (see ``captioners.captioner_members``) is a :class:`Member`: its name, the
settings that decide its output (model folder, task or tag settings) and how to build it. A member's
output for an image is cached in the project (``caption_cache.json``) under the image's content hash and
the member's key, so a second Prepare (another mode, another existing-caption rule, a recaption) runs no
model for what it already has. A member that raises on an image (or writes nothing) leaves that image
to the other member, the reason kept in the manifest entry and the log; with no member left the image
gets the trigger word (and its .txt) only, with the reason. A member that cannot be loaded at all
(its folder missing) stops the run with the message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import write_text_atomic
from core.errors import UserError
from core.regular_files import UnreadableFile, read_json_bounded
from modules.lora_training.dataset.captions import sentence_and_tags
from modules.lora_training.events import Log, PrepProgress

CACHE_VERSION = 1
MAX_CACHE_BYTES = 64 * 1024 * 1024
MAX_REASON = 300


@dataclass(frozen=True)
class Member:
    name: str  # "florence2" or "tags"
    settings: dict  # everything that decides its output
    build: Callable = field(compare=False)  # () -> Captioner

    @property
    def key(self) -> str:
        text = json.dumps({"captioner": self.name, **self.settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Failed:
    reason: str


def _file_signature(path: Path) -> list[int]:
    try:
        stat = path.stat()
    except OSError:
        return []
    return [stat.st_size, stat.st_mtime_ns]


def tag_settings(config):
    from modules.lora_training.dataset.captions import split_tags
    from modules.lora_training.dataset.wd14_tagger import TagSettings

    return TagSettings(
        general_threshold=config.tag_threshold,
        character_threshold=config.character_threshold,
        max_tags=config.max_tags,
        rating=config.rating_tag,
        underscores_to_spaces=config.tag_spaces,
        escape_brackets=config.escape_brackets,
        exclude=tuple(split_tags(config.exclude_tags)),
        include=tuple(split_tags(config.include_tags)),
    )


def _florence_member(config, models_dir: Path) -> Member:
    from modules.lora_training.dataset.captioners import Florence2Captioner, resolve_florence_model

    model = resolve_florence_model(config.caption_model, models_dir)
    return Member(
        "florence2",
        {"model": model, "task": config.caption_task},
        build=lambda: Florence2Captioner(model, task=config.caption_task),
    )


def _tagger_member(config, models_dir: Path) -> Member:
    from dataclasses import asdict

    from model_formats.demo_models import DEMO_TAGGER_NAME
    from modules.lora_training.dataset.wd14_tagger import MODEL_FILE, WD14Tagger, resolve_tagger_folder

    folder = resolve_tagger_folder(config.tagger_model, models_dir, demo_name=DEMO_TAGGER_NAME)
    settings = tag_settings(config)
    described = {"model": str(folder.resolve()), "model_file": _file_signature(folder / MODEL_FILE)}
    return Member("tags", described | asdict(settings), build=lambda: WD14Tagger(folder, settings=settings))


def members_of(config, models_dir: Path) -> list[Member]:
    """The captioners ``config.captioner`` runs, in caption order (none for ``none``)."""
    from modules.lora_training.dataset.captioners import captioner_members

    builders = {"florence2": _florence_member, "tags": _tagger_member}
    return [builders[name](config, models_dir) for name in captioner_members(config.captioner)]


class CaptionCache:
    """``{sha256: {member key: text}}`` in one JSON file; unreadable or foreign content starts it empty."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, str]] = self._read()
        self.changed = False

    def _read(self) -> dict:
        try:
            data = read_json_bounded(self.path, max_bytes=MAX_CACHE_BYTES)
        except UnreadableFile:
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {
            sha: {k: v for k, v in per.items() if isinstance(v, str)}
            for sha, per in entries.items()
            if isinstance(per, dict)
        }

    def get(self, sha256: str, key: str) -> str | None:
        return self.entries.get(sha256, {}).get(key)

    def put(self, sha256: str, key: str, text: str) -> None:
        self.entries.setdefault(sha256, {})[key] = text
        self.changed = True

    def save(self, keep: set[str]) -> None:
        """Write the cache, holding only the images in ``keep`` (the project's current set)."""
        kept = {sha: per for sha, per in self.entries.items() if sha in keep}
        if kept == self.entries and not self.changed:
            return
        self.entries = kept
        write_text_atomic(self.path, json.dumps({"version": CACHE_VERSION, "entries": kept}, indent=1))
        self.changed = False


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_REASON]


class MemberRun:
    """One member over the entries: cached outputs first, the model only for the others."""

    def __init__(self, member: Member, *, cache: CaptionCache, load: Callable, on_event, check_stop, should_stop):
        self.member = member
        self.cache = cache
        self.load = load  # entry -> PIL image
        self.on_event = on_event
        self.check_stop = check_stop
        self.should_stop = should_stop

    def outputs(self, entries: list[dict]) -> dict[str, str | Failed]:
        key = self.member.key
        results: dict[str, str | Failed] = {}
        for entry in entries:
            hit = self.cache.get(entry["sha256"], key)
            if hit is not None:
                results[entry["sha256"]] = hit
        misses = [e for e in entries if e["sha256"] not in results]
        self.on_event(
            Log(
                f"Captioning {len(misses)} image(s) with {self.member.name} "
                f"({len(results)} taken from the caption cache)"
            )
        )
        if misses:
            results |= self._run(misses)
        return results

    def _build(self):
        try:
            return self.member.build()
        except UserError:
            raise
        except Exception as exc:  # a model that does not load fails every image, each then falls back
            return Failed(_reason(exc))

    def _run(self, entries: list[dict]) -> dict[str, str | Failed]:
        captioner = self._build()
        if isinstance(captioner, Failed):
            return {e["sha256"]: captioner for e in entries}
        results: dict[str, str | Failed] = {}
        try:
            batch_size = getattr(captioner, "batch_size", 4)
            for start in range(0, len(entries), batch_size):
                self.check_stop()
                batch = entries[start : start + batch_size]
                self.on_event(PrepProgress(stage="caption", done=start, total=len(entries), item=batch[0]["source"]))
                for entry, text in zip(batch, self._caption(captioner, batch), strict=True):
                    results[entry["sha256"]] = text
                    if isinstance(text, str):
                        self.cache.put(entry["sha256"], self.member.key, text)
            self.on_event(PrepProgress(stage="caption", done=len(entries), total=len(entries)))
        finally:
            captioner.close()
        return results

    def _caption(self, captioner, batch: list[dict]) -> list[str | Failed]:
        """The batch's captions; when the batch raises, each image alone, so one bad image fails alone."""
        images = [self.load(entry) for entry in batch]
        if len(images) > 1:
            try:
                texts = captioner.caption(images, should_stop=self.should_stop)
            except Exception:  # retried image by image below
                texts = None
            self.check_stop()
            if texts is not None and len(texts) == len(images):
                return list(texts)
        return [self._one(captioner, image) for image in images]

    def _one(self, captioner, image) -> str | Failed:
        try:
            texts = captioner.caption([image], should_stop=self.should_stop)
        except Exception as exc:
            return Failed(_reason(exc))
        self.check_stop()
        return texts[0] if texts else Failed("no caption came back")


def _usable(output: str | Failed | None) -> str | Failed:
    if output is None:
        return Failed("no caption came back")
    if isinstance(output, str) and not output.strip():
        return Failed("it wrote no text")
    return output


def combine(entry: dict, outputs: dict[str, str | Failed], *, on_event) -> tuple[str, str]:
    """One image's member outputs (by member name, in caption order) → its generated text and origin.

    A failed member is left out, its reason recorded in ``entry["caption_fallback"]`` and logged."""
    usable = {name: _usable(output) for name, output in outputs.items()}
    working = [name for name, output in usable.items() if isinstance(output, str)]
    failed = {name: output.reason for name, output in usable.items() if isinstance(output, Failed)}
    source = entry["source"]
    if not working:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
        entry["caption_fallback"] = f"no captioner worked ({reasons}); trigger word and .txt only"
        on_event(Log(f"Caption of {source}: no captioner worked ({reasons}); it holds the trigger word and .txt only."))
        return "", "trigger only"
    if failed:
        reasons = "; ".join(f"{name} failed ({reason})" for name, reason in failed.items())
        used = "+".join(working)
        entry["caption_fallback"] = f"{reasons}; {used} used alone"
        on_event(Log(f"Caption of {source}: {reasons}; {used} is used alone."))
    if working == ["florence2", "tags"]:
        return sentence_and_tags(usable["florence2"], usable["tags"]), "florence2+tags"
    return usable[working[0]], working[0]
