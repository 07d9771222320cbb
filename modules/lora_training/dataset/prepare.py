"""prepare(): a messy folder of photos → cropped, captioned training images + a manifest.

Sources are only read, and only regular image files (see ``scan.py``). Re-running is
incremental: images are matched by content hash, unchanged crops and captions are reused,
captions the user edited are kept (unless ``recaption``), and images no longer in the
folder are dropped from the project. ``should_stop`` ends a run between files or
caption batches: the manifest is written only by a complete run, so a stopped one leaves
the project as it was (plus complete crop files no manifest names yet).
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import atomic_path, write_text_atomic
from core.errors import UserError
from modules.lora_training.config import PrepareConfig, config_to_dict
from modules.lora_training.dataset.buckets import Bucket, apply_crop, make_buckets, nearest_bucket, plan_crop
from modules.lora_training.dataset.caption_run import CaptionCache, Member, MemberRun, combine, members_of
from modules.lora_training.dataset.captions import (
    CLIP_CONTENT_TOKENS,
    count_clip_tokens,
    inject_trigger,
    merge_existing,
    needs_captioner,
)
from modules.lora_training.dataset.images import (
    RejectedImage,
    brightness_and_spread,
    difference_hash,
    hamming,
    load_image,
)
from modules.lora_training.dataset.masks import MASK_SUFFIX, read_mask_beside
from modules.lora_training.dataset.scan import (
    CAPTION_SUFFIX,
    DEFAULT_LIMITS,
    IMAGE_SIZE_SETTING,
    RejectedFile,
    ScanLimits,
    StopRequested,
    image_folder,
    never_stop,
    read_caption_beside,
    read_regular_file,
    scan_folder,
)
from modules.lora_training.events import EventSink, Log, PrepFinished, PrepProgress, ignore_events
from modules.lora_training.manifest import ProjectManifest, bucket_histogram
from modules.lora_training.names import validate_trigger
from modules.lora_training.project import ProjectPaths

BLANK_SPREAD = 2.0  # luminance standard deviation below which an image is one flat colour


@dataclass
class PrepareResult:
    project_dir: Path
    used: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # image-like files only: they are named
    not_read: Counter = field(default_factory=Counter)  # every other entry, by reason, never named
    captioned: int = 0
    status: str = "finished"  # or "stopped"

    def bucket_histogram(self) -> dict[str, int]:
        return bucket_histogram(self.used)

    def skip_reasons(self) -> dict[str, int]:
        return dict((Counter(_reason_kind(e["reason"]) for e in self.skipped) + self.not_read).most_common())

    def truncated(self) -> list[dict]:
        return [e for e in self.used if e.get("caption_truncated")]

    def summary(self) -> str:
        lines = [f"Prepared {len(self.used)} image(s) in {self.project_dir}; skipped {len(self.skipped)}."]
        for entry in self.skipped:
            lines.append(f"  skipped {entry['source']}: {entry['reason']}")
        for reason, count in self.not_read.most_common():
            lines.append(f"  not read: {count} x {reason}")
        for entry in self.used:
            if entry.get("caption_note"):
                lines.append(f"  {entry['source']}: {entry['caption_note']}")
            if entry.get("caption_fallback"):
                lines.append(f"  caption of {entry['source']}: {entry['caption_fallback']}")
            if entry.get("mask_note"):
                lines.append(f"  {entry['source']}: {entry['mask_note']}")
        masked = sum(1 for entry in self.used if entry.get("mask"))
        if masked:
            lines.append(f"Loss masks: {masked} of {len(self.used)} image(s) (from alpha or .mask.png)")
        if self.used:
            buckets = ", ".join(f"{k}: {v}" for k, v in self.bucket_histogram().items())
            lines.append(f"Buckets: {buckets}")
        lines.append(f"Captioned now: {self.captioned}; reused: {len(self.used) - self.captioned}.")
        for entry in self.truncated():
            lines.append(
                f"  caption of {entry['source']} has {entry['caption_tokens']} tokens; CLIP reads the first "
                f"{CLIP_CONTENT_TOKENS}, the rest is cut"
            )
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(" of ")[0]


_COPY_SUFFIX = re.compile(r"(\s*\(\d+\)|[\s_-]*(-\s*)?(copy|kopie|copie)(\s*\(?\d+\)?)?)$", re.IGNORECASE)


def original_first(relative: str) -> tuple:
    """Sort key putting the file that looks original before its copies ("IMG_1.jpg" before "IMG_1 (1).jpg"
    and "IMG_1 - Copy.jpg"), so that of two duplicates the original is the one kept."""
    path = Path(relative)
    stem = path.stem
    is_copy = bool(_COPY_SUFFIX.search(stem))
    return (str(path.parent), is_copy, len(stem), relative)


def _slug(stem: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return (slug or "image")[:40]


def _check_inputs(config: PrepareConfig, projects_dir: Path, image_roots) -> tuple[ProjectPaths, Path]:
    paths = ProjectPaths.for_project(projects_dir, config.project)
    images_dir = image_folder(config.images_dir, roots=image_roots)
    if images_dir != paths.source and (images_dir == paths.root or paths.root in images_dir.parents):
        raise UserError("The image folder is inside the project folder; choose your original photos instead.")
    validate_trigger(config.trigger)
    return paths, images_dir


class _Preparation:
    def __init__(
        self,
        config: PrepareConfig,
        paths: ProjectPaths,
        images_dir: Path,
        *,
        on_event: EventSink,
        should_stop: Callable[[], bool],
        limits: ScanLimits,
    ) -> None:
        self.config = config
        self.paths = paths
        self.images_dir = images_dir
        self.on_event = on_event
        self.should_stop = should_stop
        self.limits = limits
        self.buckets = make_buckets(config.resolution)
        old = ProjectManifest.read_or_none(paths) or ProjectManifest()
        self.old_by_hash = {e.get("sha256"): e for e in old.used_entries()}
        self.result = PrepareResult(project_dir=paths.root)

    def skip(self, source: str, reason: str, sha256: str | None = None) -> None:
        self.result.skipped.append({"source": source, "status": "skipped", "reason": reason, "sha256": sha256})

    def check_stop(self) -> None:
        if self.should_stop():
            raise StopRequested()

    def scan(self) -> list:
        found = scan_folder(
            self.images_dir,
            include_subfolders=self.config.include_subfolders,
            limits=self.limits,
            should_stop=self.should_stop,
        )
        for relative, reason in found.refused:
            self.skip(relative, reason)
        self.result.not_read = found.ignored
        if not found.files and not found.refused:
            if not found.ignored:
                raise UserError(f"Image folder {self.images_dir} is empty: add some photos (JPEG, PNG, WebP...).")
            counts = ", ".join(f"{count} x {reason}" for reason, count in found.ignored.most_common())
            raise UserError(f"Image folder {self.images_dir} holds no image files (JPEG, PNG, WebP...): {counts}.")
        return found.files

    def scan_and_crop(self) -> None:
        files = sorted(self.scan(), key=lambda source: original_first(source.relative))
        self.seen_hashes: dict[str, str] = {}
        self.seen_dhashes: list[tuple[int, float, str]] = []
        self.paths.images.mkdir(parents=True, exist_ok=True)
        for index, source in enumerate(files):
            self.check_stop()
            self.on_event(PrepProgress(stage="scan", done=index, total=len(files), item=source.relative))
            self.take(source)
        self.on_event(PrepProgress(stage="scan", done=len(files), total=len(files)))
        if not self.result.used:
            raise UserError(
                f"No usable image in {self.images_dir}: {len(self.result.skipped)} file(s) skipped "
                f"({', '.join(f'{k}: {v}' for k, v in self.result.skip_reasons().items())})."
            )

    def take(self, source) -> None:
        """Use ``source`` (crop it into the project) or record why not."""
        try:
            data = read_regular_file(
                source.path, folder=self.images_dir, max_bytes=self.limits.max_image_bytes, setting=IMAGE_SIZE_SETTING
            )
            loaded = load_image(data)
        except (RejectedFile, RejectedImage) as exc:
            self.skip(source.relative, str(exc))
            return
        del data
        short = min(loaded.width, loaded.height)
        if short < self.config.minimum_side:
            self.skip(
                source.relative,
                f"too small ({loaded.width}x{loaded.height}; the short side needs at least "
                f"{self.config.minimum_side} px for resolution {self.config.resolution})",
                loaded.sha256,
            )
            return
        if loaded.sha256 in self.seen_hashes:
            self.skip(source.relative, f"duplicate of {self.seen_hashes[loaded.sha256]}", loaded.sha256)
            return
        brightness, spread = brightness_and_spread(loaded.image)
        if spread < BLANK_SPREAD:
            self.skip(source.relative, "blank image (one flat colour, nothing to learn)", loaded.sha256)
            return
        dhash = difference_hash(loaded.image)
        twin = next(
            (
                name
                for h, level, name in self.seen_dhashes
                if hamming(h, dhash) <= self.config.duplicate_threshold and abs(level - brightness) < 16
            ),
            None,
        )
        if twin:
            self.skip(source.relative, f"near-duplicate of {twin}", loaded.sha256)
            return
        self.seen_hashes[loaded.sha256] = source.relative
        self.seen_dhashes.append((dhash, brightness, source.relative))
        self.result.used.append(self._crop(source, loaded))

    def _crop(self, source, loaded) -> dict:
        bucket: Bucket = nearest_bucket(loaded.width, loaded.height, self.buckets)
        crop = plan_crop(loaded.width, loaded.height, bucket)
        name = f"{_slug(Path(source.relative).stem)}-{loaded.sha256[:10]}"
        image_path = self.paths.images / f"{name}.png"
        entry = {
            "source": source.relative,
            "sha256": loaded.sha256,
            "status": "used",
            "reason": "",
            "image": image_path.name,
            "caption_file": f"{name}{CAPTION_SUFFIX}",
            "original_size": [loaded.width, loaded.height],
            "bucket": [bucket.width, bucket.height],
            "crop": {"resized": [crop.resized_width, crop.resized_height], "left": crop.left, "top": crop.top},
        }
        entry["source_caption"], note = read_caption_beside(
            source.path, folder=self.images_dir, max_bytes=self.limits.max_caption_bytes
        )
        if note:
            entry["caption_note"] = note
        old = self.old_by_hash.get(loaded.sha256)
        reusable = old and old.get("bucket") == entry["bucket"] and old.get("crop") == entry["crop"]
        if not (reusable and image_path.is_file()):
            with atomic_path(image_path) as tmp:
                apply_crop(loaded.image, crop).save(tmp, format="PNG")
        self._crop_mask(source, loaded, crop=crop, entry=entry, name=name)
        return entry

    def _crop_mask(self, source, loaded, *, crop, entry: dict, name: str) -> None:
        """The photo's loss mask (the file beside it, else its alpha), cropped exactly as the photo."""
        mask, note = read_mask_beside(
            source.path,
            folder=self.images_dir,
            max_bytes=self.limits.max_image_bytes,
            size=(loaded.width, loaded.height),
        )
        origin = "file"
        if mask is None and loaded.alpha is not None:
            mask, origin = loaded.alpha, "alpha"
        if note:
            entry["mask_note"] = note
        if mask is None:
            return
        mask_path = self.paths.images / f"{name}{MASK_SUFFIX}"
        with atomic_path(mask_path) as tmp:
            apply_crop(mask, crop).save(tmp, format="PNG")
        entry.update(mask=mask_path.name, mask_from=origin)

    def _caption_by(self, members: list[Member]) -> str:
        """What decided the captions: a change re-captions (outputs already in the caption cache are reused)."""
        if not members:
            return "none"
        by = f"{self.config.captioner}:{self.config.caption_task}:{self.config.caption_model or 'default'}"
        return by + "".join(f":{m.name}={m.key}" for m in members if m.name != "florence2")

    def caption(self, models_dir: Path) -> None:
        """Decide each caption; run the captioners only on images that need it."""
        members = members_of(self.config, models_dir)
        caption_by = self._caption_by(members)
        to_caption: list[dict] = []
        for entry in self.result.used:
            old = self.old_by_hash.get(entry["sha256"])
            caption_path = self.paths.images / entry["caption_file"]
            current = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else None
            edited = old is not None and current is not None and current != old.get("caption")
            if edited and not self.config.recaption:
                entry.update(caption=current, caption_raw=old.get("caption_raw", ""), caption_origin="edited by user")
                continue
            same_inputs = (
                old is not None
                and old.get("caption_by") == caption_by
                and old.get("source_caption") == entry["source_caption"]
                and old.get("existing_captions") == self.config.existing_captions
            )
            if same_inputs and not self.config.recaption:
                entry.update(caption_raw=old.get("caption_raw", ""), caption_origin=old.get("caption_origin", ""))
                if old.get("caption_fallback"):
                    entry["caption_fallback"] = old["caption_fallback"]
            elif needs_captioner(entry["source_caption"], self.config.existing_captions) and members:
                to_caption.append(entry)
                continue
            else:
                entry.update(
                    caption_raw=merge_existing(entry["source_caption"], None, self.config.existing_captions),
                    caption_origin="existing .txt" if entry["source_caption"] else "trigger only",
                )
            entry["caption"] = inject_trigger(entry["caption_raw"], self.config.trigger)
        if to_caption:
            self._run_captioners(to_caption, members)
        for entry in self.result.used:
            entry["caption_by"] = caption_by
            entry["existing_captions"] = self.config.existing_captions

    def _load_crop(self, entry: dict):
        from PIL import Image

        with Image.open(self.paths.images / entry["image"]) as opened:
            return opened.convert("RGB")

    def _run_captioners(self, entries: list[dict], members: list[Member]) -> None:
        cache = CaptionCache(self.paths.caption_cache)
        outputs = {}
        try:
            for member in members:
                run = MemberRun(
                    member,
                    cache=cache,
                    load=self._load_crop,
                    on_event=self.on_event,
                    check_stop=self.check_stop,
                    should_stop=self.should_stop,
                )
                outputs[member.name] = run.outputs(entries)
        finally:
            cache.save({entry["sha256"] for entry in self.result.used})
        for entry in entries:
            by_member = {member.name: outputs[member.name].get(entry["sha256"]) for member in members}
            generated, origin = combine(entry, by_member, on_event=self.on_event)
            entry["caption_raw"] = merge_existing(entry["source_caption"], generated, self.config.existing_captions)
            entry["caption_origin"] = origin
            entry["caption"] = inject_trigger(entry["caption_raw"], self.config.trigger)
            self.result.captioned += 1

    def count_tokens(self) -> None:
        from model_formats.tokenizers import build_clip_tokenizer

        tokenizer = build_clip_tokenizer()
        for entry in self.result.used:
            entry["caption_tokens"] = count_clip_tokens(tokenizer, entry["caption"])
            entry["caption_truncated"] = entry["caption_tokens"] > CLIP_CONTENT_TOKENS

    def write(self) -> None:
        keep = set()
        for entry in self.result.used:
            keep.update((entry["image"], entry["caption_file"], entry.get("mask")))
            caption_path = self.paths.images / entry["caption_file"]
            current = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else None
            if current != entry["caption"]:
                write_text_atomic(caption_path, entry["caption"] + "\n")
        for stale in self.paths.images.iterdir():
            if stale.is_file() and stale.name not in keep:
                stale.unlink()
        ProjectManifest(
            settings=config_to_dict(self.config),
            entries=tuple(self.result.used + self.result.skipped),
            source_dir=str(self.images_dir),
            not_read=dict(self.result.not_read),
        ).write(self.paths)


def prepare(
    config: PrepareConfig,
    *,
    projects_dir: Path,
    models_dir: Path,
    on_event: EventSink = ignore_events,
    should_stop: Callable[[], bool] = never_stop,
    image_roots: Iterable[Path] | None = None,
    limits: ScanLimits = DEFAULT_LIMITS,
) -> PrepareResult:
    """Prepare ``config.images_dir`` into the project folder; returns a PrepareResult.

    ``image_roots``: the folder must lie inside one of them (the app passes its IMAGE_ROOTS;
    None, for the CLI and library use, reads any folder the caller can). ``should_stop``
    ends the run early: the result's status is then "stopped".
    """
    paths, images_dir = _check_inputs(config, projects_dir, image_roots)
    is_new_project = not paths.root.exists()
    work = _Preparation(config, paths, images_dir, on_event=on_event, should_stop=should_stop, limits=limits)
    try:
        work.scan_and_crop()
        work.caption(models_dir)
        work.check_stop()
        work.count_tokens()
        work.write()
    except StopRequested:
        work.result.status = "stopped"
        kept = "nothing is prepared yet" if not work.old_by_hash else "the project keeps its previous prepared set"
        on_event(Log(f"Preparation stopped: {kept}. Prepare again to finish."))
        return work.result
    except BaseException:
        if is_new_project:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    result = work.result
    on_event(Log(result.summary()))
    on_event(PrepFinished(project_dir=str(paths.root), used=len(result.used), skipped=len(result.skipped)))
    return result
