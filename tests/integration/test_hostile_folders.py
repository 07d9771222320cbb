"""Prepare on hostile folders: special files, /dev, empty paths, folders outside IMAGE_ROOTS,
private file names, huge files, and Stop. Every prepare runs under a timeout: a hang fails
the test instead of freezing the suite."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from core.errors import UserError
from modules.lora_training.config import PrepareConfig, config_from_dict
from modules.lora_training.dataset.prepare import prepare
from modules.lora_training.dataset.scan import ScanLimits
from modules.lora_training.events import PrepProgress
from tests.image_folders import noise_image

PRIVATE_NAMES = ("id_rsa", "passwords.kdbx")


def _config(images, **changes) -> PrepareConfig:
    values = {"project": "hostile", "images_dir": str(images), "trigger": "ohwx", "resolution": 64, "captioner": "none"}
    return config_from_dict(PrepareConfig, {**values, **changes})


def _photos(folder: Path, count: int = 3, *, seed: int = 500) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        noise_image(80, 80, seed=seed + index).save(folder / f"good{index}.png")
    return folder


def _within(seconds: float, function, *args, **kwargs):
    """``function(...)`` in a daemon thread; fails when it has not returned after ``seconds``."""
    box = {}

    def run():
        try:
            box["value"] = function(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a special file was opened"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _prepare(tmp_path, config, **options):
    return prepare(config, projects_dir=tmp_path / "projects", models_dir=tmp_path / "models", **options)


def test_fifo_socket_and_device_are_skipped_with_a_reason(tmp_path):
    photos = _photos(tmp_path / "photos")
    os.mkfifo(photos / "pipe.png")
    os.mkfifo(photos / "pipe")
    os.mkfifo(photos / "good0.txt")  # a caption beside a good image
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(photos / "sock.jpg"))
    try:
        os.mknod(photos / "zero.png", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero's device
        device = True
    except (PermissionError, OSError):
        device = False
    try:
        result = _within(30, _prepare, tmp_path, _config(photos))
    finally:
        server.close()
    reasons = {e["source"]: e["reason"] for e in result.skipped}
    assert reasons["pipe.png"] == "not a regular file (named pipe)"
    assert reasons["sock.jpg"] == "not a regular file (socket)"
    assert not device or reasons["zero.png"] == "not a regular file (device)"
    assert result.not_read["not a regular file (named pipe)"] == 1, "the unnamed FIFO is counted, not named"
    assert len(result.used) == 3
    good0 = next(e for e in result.used if e["source"] == "good0.png")
    assert good0["source_caption"] is None
    assert good0["caption_note"] == "caption file ignored: not a regular file (named pipe)"


def test_dev_is_refused_within_seconds(tmp_path):
    with pytest.raises(UserError, match=f"not inside the folders this app may read \\({tmp_path}\\)"):
        _within(10, _prepare, tmp_path, _config("/dev"), image_roots=[tmp_path])
    # Without roots (the CLI), /dev is listed but nothing in it is opened.
    with pytest.raises(UserError, match="holds no image files"):
        _within(30, _prepare, tmp_path, _config("/dev"))
    assert not (tmp_path / "projects" / "hostile").exists()


@pytest.mark.parametrize("empty", ["", "   ", "."])
def test_an_empty_path_is_refused_before_anything_is_read(tmp_path, monkeypatch, empty):
    working = _photos(tmp_path / "working")
    monkeypatch.chdir(working)  # Path("") is "." : this folder must never be prepared
    with pytest.raises(UserError, match="^Image folder is empty: type the folder that holds your photos"):
        _within(10, _prepare, tmp_path, _config(empty))
    with pytest.raises(UserError, match="^Image folder is empty"):
        PrepareConfig(project="p", images_dir=Path(empty), trigger="ohwx")
    assert not (tmp_path / "projects").exists()


def test_folders_outside_the_roots_or_hidden_are_refused(tmp_path):
    allowed = tmp_path / "allowed"
    inside = _photos(allowed / "cat")
    elsewhere = _photos(tmp_path / "elsewhere")
    (allowed / "link").symlink_to(elsewhere)
    hidden = _photos(allowed / ".cache" / "cat")
    roots = [allowed]
    for folder in (elsewhere, allowed / "link", allowed / "cat" / ".." / ".." / "elsewhere"):
        with pytest.raises(UserError, match=f"not inside .*\\({allowed}\\).*IMAGE_ROOTS in config.json"):
            _within(10, _prepare, tmp_path, _config(folder), image_roots=roots)
    with pytest.raises(UserError, match="inside the hidden folder .cache"):
        _within(10, _prepare, tmp_path, _config(hidden), image_roots=roots)
    with pytest.raises(UserError, match="No image roots"):
        _within(10, _prepare, tmp_path, _config(inside), image_roots=[])
    assert not (tmp_path / "projects" / "hostile").exists()
    result = _within(30, _prepare, tmp_path, _config(inside), image_roots=roots)
    assert len(result.used) == 3


def test_private_file_names_never_reach_events_logs_or_the_manifest(tmp_path):
    photos = _photos(tmp_path / "photos")
    for name in PRIVATE_NAMES:
        (photos / name).write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    events = []
    result = _within(30, _prepare, tmp_path, _config(photos), on_event=events.append)
    manifest = (result.project_dir / "manifest.json").read_text()
    everything = "\n".join([manifest, result.summary(), *map(repr, events)])
    assert len(result.used) == 3
    assert "2 x not an image file (by its extension)" in result.summary()
    for name in PRIVATE_NAMES:
        assert name not in everything
    only_private = tmp_path / "private"
    only_private.mkdir()
    for name in PRIVATE_NAMES:
        (only_private / name).write_text("secret")
    with pytest.raises(UserError) as refused:
        _within(10, _prepare, tmp_path, _config(only_private, project="other"))
    assert "2 x not an image file" in str(refused.value)
    assert not any(name in str(refused.value) for name in PRIVATE_NAMES)


def test_hidden_entries_skipped_and_subfolders_only_when_asked(tmp_path):
    photos = _photos(tmp_path / "photos", count=1)
    noise_image(80, 80, seed=1).save(photos / ".hidden.png")
    _photos(photos / ".secret", count=1, seed=2)
    noise_image(80, 80, seed=3).save(_photos(photos / "sub", count=0) / "nested.png")
    flat = _within(30, _prepare, tmp_path, _config(photos))
    assert {e["source"] for e in flat.used} == {"good0.png"}
    assert flat.not_read == {"hidden file or folder": 2, "subfolder (include subfolders is off)": 1}
    deep = _within(30, _prepare, tmp_path, _config(photos, include_subfolders=True))
    assert {e["source"] for e in deep.used} == {"good0.png", "sub/nested.png"}


def test_oversized_files_are_skipped_unread(tmp_path):
    photos = _photos(tmp_path / "photos")
    with open(photos / "huge.png", "wb") as sparse:
        sparse.truncate(201 * 2**20)
    (photos / "good1.txt").write_text("word " * 14_000)
    result = _within(30, _prepare, tmp_path, _config(photos))
    reasons = {e["source"]: e["reason"] for e in result.skipped}
    assert reasons == {"huge.png": "file too large (201.0 MB; the limit is 200.0 MB, MAX_IMAGE_FILE_MB in config.json)"}
    good1 = next(e for e in result.used if e["source"] == "good1.png")
    assert good1["caption_note"] == "caption file ignored: file too large (68 KB; the limit is 64 KB)"
    with pytest.raises(UserError, match="No usable image.*file too large: 4"):
        _within(30, _prepare, tmp_path, _config(photos, project="small"), limits=ScanLimits(max_image_bytes=10))


def test_scanning_is_bounded(tmp_path):
    photos = _photos(tmp_path / "photos", count=1)
    for index in range(300):
        (photos / f"file{index}").write_bytes(b"")
    with pytest.raises(UserError, match="more than 100 entries"):
        _within(10, _prepare, tmp_path, _config(photos), limits=ScanLimits(max_entries=100))
    with pytest.raises(UserError, match="took over 0 s"):
        _within(10, _prepare, tmp_path, _config(photos), limits=ScanLimits(max_seconds=0))
    deep = photos / "a" / "b"
    _photos(deep, count=1, seed=9)
    result = _within(30, _prepare, tmp_path, _config(photos, include_subfolders=True), limits=ScanLimits(max_depth=1))
    assert result.not_read["folder nested deeper than 1 levels"] == 1


def _slow_loading(monkeypatch, seconds: float = 0.1):
    from modules.lora_training.dataset import prepare as prepare_module

    real = prepare_module.load_image

    def slow(data):
        time.sleep(seconds)
        return real(data)

    monkeypatch.setattr(prepare_module, "load_image", slow)


def test_prepare_stops_within_a_second_and_the_project_stays_consistent(tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos", count=3)
    first = _within(30, _prepare, tmp_path, _config(photos))
    manifest = first.project_dir / "manifest.json"
    before = manifest.read_bytes()
    _photos(photos, count=30, seed=700)  # good0..good29: new content for most names
    _slow_loading(monkeypatch)
    stop, started = threading.Event(), threading.Event()

    def on_event(event):
        if isinstance(event, PrepProgress):
            started.set()

    box = {}
    worker = threading.Thread(
        target=lambda: box.setdefault(
            "result", _prepare(tmp_path, _config(photos), on_event=on_event, should_stop=stop.is_set)
        ),
        daemon=True,
    )
    worker.start()
    assert started.wait(30)
    stop.set()
    stopped_at = time.monotonic()
    worker.join(10)
    assert time.monotonic() - stopped_at < 1.0, "prepare returned within 1 s of the stop"
    assert box["result"].status == "stopped"
    assert manifest.read_bytes() == before, "the previous prepared set is untouched"
    assert not [p for p in first.project_dir.rglob("*") if p.name.endswith(".partial")]
    monkeypatch.undo()
    again = _within(60, _prepare, tmp_path, _config(photos))
    assert again.status == "finished" and len(again.used) == 30
    names = {p.name for p in (again.project_dir / "images").iterdir()}
    assert names == {e["image"] for e in again.used} | {e["caption_file"] for e in again.used}


def test_captioning_stops_within_a_second(tmp_path, demo_paths):
    """Stop while Florence-2 generates: it is checked at every token, not only between batches."""
    photos = _photos(tmp_path / "photos", count=6)
    stop = threading.Event()
    stopped_at = []
    checks = []

    def should_stop():
        checks.append(time.monotonic())
        if len(checks) == 3:  # the generation of the first batch has begun
            threading.Timer(0.05, lambda: (stopped_at.append(time.monotonic()), stop.set())).start()
        return stop.is_set()

    def on_event(event):
        if isinstance(event, PrepProgress) and event.stage == "caption":
            checks.clear()

    config = _config(photos, captioner="florence2", caption_model=str(demo_paths.florence_folder))
    result = _within(120, _prepare, tmp_path, config, on_event=on_event, should_stop=should_stop)
    assert result.status == "stopped" and result.captioned == 0
    assert time.monotonic() - stopped_at[0] < 1.0
    assert not (result.project_dir / "manifest.json").exists()


@pytest.fixture
def jobs(tmp_path):
    from core.config import ensure_folders, load_config
    from core.model_manager import ModelManager
    from modules.lora_training.jobs import TrainingJobs
    from tests.conftest import write_config

    config = load_config(write_config(tmp_path, tmp_path / "models", MAX_IMAGE_FILE_MB=1))
    ensure_folders(config)
    manager = ModelManager(models_dir=config.MODELS_DIR, loras_dir=config.LORAS_DIR, device="cpu")
    return TrainingJobs(model_manager=manager, app_config=config)


def _wait_for(jobs, predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = jobs.snapshot()
        if predicate(snapshot):
            return snapshot
        time.sleep(0.02)
    raise AssertionError(f"timed out; last state {jobs.snapshot()['state']}")


def test_a_prepare_job_stops_and_the_next_job_starts(jobs, tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos", count=40)
    for name in PRIVATE_NAMES:
        (photos / name).write_text("secret")
    with open(photos / "big.png", "wb") as sparse:
        sparse.truncate(2 * 2**20)  # over this app's MAX_IMAGE_FILE_MB of 1
    _slow_loading(monkeypatch)
    jobs.start(prepare_config=_config(photos))
    _wait_for(jobs, lambda s: s["state"] == "preparing" and s["prep_done"] >= 2)
    assert "Stopping the preparation" in jobs.stop()
    stopped_at = time.monotonic()
    snapshot = jobs.wait(10)
    assert time.monotonic() - stopped_at < 1.0
    assert snapshot["state"] == "stopped" and "Preparation stopped" in snapshot["message"]
    monkeypatch.undo()
    jobs.start(prepare_config=_config(photos))
    done = jobs.wait(60)
    assert done["state"] == "prepared", done["message"]
    log = "\n".join(done["log"])
    assert "skipped big.png: file too large (2.0 MB; the limit is 1.0 MB" in log
    assert not any(name in json.dumps([snapshot, done]) for name in PRIVATE_NAMES)


def test_the_server_refuses_folders_outside_its_roots_at_once(jobs, tmp_path):
    with pytest.raises(UserError, match=f"/dev is not inside .*{tmp_path}"):
        jobs.start(prepare_config=_config("/dev"))
    assert jobs.snapshot()["state"] == "idle"
