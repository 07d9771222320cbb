"""Batch generation on the tiny demo models: a CSV or JSON file of rows → images with their settings in the
PNG metadata, a manifest and a contact sheet; deterministic; a failing row is recorded and the rest goes on;
Stop stops between rows (and the row in flight at its next step, while it waits for the pipeline, and
before its LoRAs when it stops during its model's load); hostile files are refused with messages."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from core.job_queue import JobStore
from core.job_runner import JobRunner
from core.model_manager import GenerateLimits, ModelManager
from modules.generate.batch import BatchDefaults, parse_batch, read_batch_file
from modules.generate.batch_job import BatchRunner
from modules.generate.batch_kinds import BatchKinds
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME
from tests.lora_files import write_diffusers_lora

SDXL_FILE = f"{DEMO_SDXL_NAME}.safetensors"

CSV_BATCH = f"""prompt,negative,model,loras,seed,width,height,steps,guidance
a red apple,,{DEMO_SDXL_NAME},,5,64,64,2,5
a green pear,blurry,{DEMO_SDXL_NAME},style.safetensors:0.8,,64,128,3,4.5
"a cat, sitting",,{SDXL_FILE},style.safetensors:-0.5,7,64,64,2,
"""

JSON_BATCH = [
    {"prompt": "a blue car", "model": SDXL_FILE, "seed": 11, "width": 128, "height": 64, "steps": 2},
    {"prompt": "a lighthouse", "model": DEMO_FLUX_NAME, "width": 64, "height": 64, "steps": 2, "guidance": 3.5},
    {"prompt": "a house", "loras": [{"name": "style.safetensors", "weight": 1.2}], "steps": 2, "seed": 3},
]


@pytest.fixture(scope="module")
def loras(tmp_path_factory, demo_paths):
    folder = tmp_path_factory.mktemp("loras")
    write_diffusers_lora(demo_paths.sdxl_folder, folder / "style.safetensors", family="sdxl")
    return folder


@pytest.fixture(scope="module")
def manager(models_dir, loras):
    return ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")


def _defaults() -> BatchDefaults:
    return BatchDefaults(model=DEMO_SDXL_NAME, size_for=lambda model: 64, limits=GenerateLimits())


def _runner(manager, tmp_path) -> BatchRunner:
    return BatchRunner(manager=manager, outputs_dir=tmp_path / "outputs", defaults=_defaults)


def _run(runner, text: str, *, base_seed=100) -> dict:
    started = runner.start(text, base_seed=base_seed)
    runner.job(started["id"]).join(timeout=300)
    status = runner.status(started["id"])
    assert status["state"] == "done", status
    return status


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_six_rows_csv_and_json_make_six_images_with_their_settings(manager, tmp_path):
    runner = _runner(manager, tmp_path)
    first = [_run(runner, CSV_BATCH), _run(runner, json.dumps(JSON_BATCH))]
    rows = [row for status in first for row in status["rows"]]
    assert len(rows) == 6 and all(row["status"] == "done" for row in rows)
    assert rows[1]["settings"]["seed"] == 101, "no seed: the base seed + the row's index"
    assert rows[5]["settings"]["model"] == DEMO_SDXL_NAME and rows[5]["settings"]["width"] == 64, "defaults"
    for status in first:
        folder = status["folder"]
        manifest = json.loads(Path(folder, "manifest.json").read_text())
        assert manifest["rows"] == status["rows"] and manifest["base_seed"] == 100
        assert Image.open(status["contact_sheet"]).size[0] > 128
        for row in status["rows"]:
            with Image.open(os.path.join(folder, row["file"])) as image:
                meta = json.loads(image.info["lora_studio"])
                size = image.size
            settings = row["settings"]
            assert size == (settings["width"], settings["height"])
            for key in ("model", "prompt", "seed", "steps", "guidance", "loras", "width", "height"):
                assert meta[key] == settings[key], key
            assert f"Seed: {settings['seed']}" in Image.open(os.path.join(folder, row["file"])).info["parameters"]
    again = [_run(runner, CSV_BATCH), _run(runner, json.dumps(JSON_BATCH))]
    for before, after in zip(first, again, strict=True):
        assert before["folder"] != after["folder"]
        for a, b in zip(before["images"], after["images"], strict=True):
            assert np.array_equal(_pixels(a), _pixels(b)), "same rows, same images"


def test_a_failing_row_is_recorded_and_the_others_finish(manager, tmp_path):
    text = (
        "prompt,model,loras,width,height,steps\n"
        "one,missing-model.safetensors,,64,64,2\n"
        f"two,{DEMO_FLUX_NAME},style.safetensors:0.5,64,64,2\n"
        f"three,{DEMO_SDXL_NAME},,4096,64,2\n"
        f"four,{DEMO_SDXL_NAME},,64,64,2\n"
    )
    status = _run(_runner(manager, tmp_path), text)
    rows = status["rows"]
    assert [row["status"] for row in rows] == ["failed", "failed", "failed", "done"]
    assert "not found" in rows[0]["error"]
    assert "SDXL LoRA" in rows[1]["error"]
    assert "Width 4096" in rows[2]["error"]
    assert status["done"] == 4 and status["failed"] == 3 and len(status["images"]) == 1
    assert os.path.isfile(status["contact_sheet"])


class _GatedManager:
    """The real manager; the second generation waits for the test's go before it starts."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.go = inner, 0, threading.Event()

    def generate(self, request, *, client_present):
        self.calls += 1
        if self.calls == 2:
            self.go.wait(30)
        return self.inner.generate(request, client_present=client_present)


def test_stop_stops_between_rows_and_the_row_in_flight(manager, tmp_path):
    gated = _GatedManager(manager)
    runner = BatchRunner(manager=gated, outputs_dir=tmp_path / "outputs", defaults=_defaults)
    started = runner.start("prompt,steps\n" + "".join(f"row {n},2\n" for n in range(5)), base_seed=1)
    deadline = time.monotonic() + 120
    while runner.status()["done"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.stop()
    gated.go.set()  # row 2 starts now, and stops at its first denoising step
    runner.job(started["id"]).join(timeout=60)
    status = runner.status(started["id"])
    assert status["state"] == "stopped" and status["done"] == 1 and len(status["images"]) == 1
    assert [row["status"] for row in status["rows"]] == ["done"] + ["not run"] * 4
    assert status["rows"][1]["error"] == "Stopped by the user."
    assert gated.calls == 2, "no row started after Stop"
    manifest = json.loads(Path(status["folder"], "manifest.json").read_text())
    assert manifest["state"] == "stopped"


def _wait_for(condition, *, timeout: float) -> float:
    """Seconds until ``condition()`` held (fails past ``timeout``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def _assert_stopped_and_recorded(status: dict) -> None:
    assert status["state"] == "stopped" and status["images"] == [], status
    assert {row["status"] for row in status["rows"]} == {"not run"}
    assert status["rows"][0]["error"] == "Stopped by the user."
    manifest = json.loads(Path(status["folder"], "manifest.json").read_text())
    assert manifest["state"] == "stopped" and manifest["rows"] == status["rows"]
    assert sorted(os.listdir(status["folder"])) == ["contact-sheet.png", "manifest.json"], "nothing half-written"


def test_stop_ends_a_batch_that_waits_for_the_pipeline(manager, tmp_path):
    """Another generation holds the pipeline for long: Stop ends the waiting batch within a second."""
    runner = _runner(manager, tmp_path)
    held, done = threading.Event(), threading.Event()

    def generation_in_flight():  # the real lock, held as a long generation of the Generate tab holds it
        with manager._lock:
            held.set()
            done.wait(30)

    holder = threading.Thread(target=generation_in_flight)
    holder.start()
    try:
        held.wait(5)
        started = runner.start("prompt,steps\nrow 1,2\nrow 2,2\n", base_seed=1)
        time.sleep(0.5)
        assert runner.status(started["id"])["state"] == "running"
        runner.stop()
        took = _wait_for(lambda: not runner.job(started["id"]).running, timeout=5)
    finally:
        done.set()
        holder.join()
    assert took < 1.0, f"the batch ended {took:.2f} s after Stop"
    _assert_stopped_and_recorded(runner.status(started["id"]))


class _SlowLoadManager(ModelManager):
    """The real manager, whose model load waits for the test's go (a long load); counts LoRA loads."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.loading, self.go, self.lora_loads, self.loaded_at = threading.Event(), threading.Event(), 0, None

    def _build_pipeline(self, entry):
        self.loading.set()
        self.go.wait(30)
        pipe = super()._build_pipeline(entry)
        self.loaded_at = time.monotonic()
        return pipe

    def _load_adapter(self, path, adapter, lora):
        self.lora_loads += 1
        return super()._load_adapter(path, adapter, lora)


def test_queue_cancel_during_a_model_load_starts_no_other_load(models_dir, loras, tmp_path):
    """Cancelled while a row loads its model: the load ends, no LoRA is loaded after it, no step runs, and
    the queued job ends cancelled with its manifest."""
    manager = _SlowLoadManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    batches = _runner(manager, tmp_path)
    queue = JobRunner(JobStore(tmp_path / "queue.sqlite"), tick_s=0.05)
    kinds = BatchKinds(batches)
    queue.register(kinds)
    queue.start()
    try:
        text = "prompt,loras,steps\nrow 1,style.safetensors:0.8,2\nrow 2,style.safetensors:0.5,2\n"
        job = queue.enqueue("batch", "", kinds.batch_payload(text, base_seed=1))
        assert manager.loading.wait(30)
        queue.cancel(job["id"])
        manager.go.set()
        _wait_for(lambda: queue.store.get(job["id"]).state != "running", timeout=60)
        took = time.monotonic() - manager.loaded_at
    finally:
        manager.go.set()
        queue.close()
    assert queue.store.get(job["id"]).state == "cancelled"
    assert took < 1.0, f"the job ended {took:.2f} s after the load"
    assert manager.lora_loads == 0, "a LoRA was loaded after Stop"
    assert manager.loaded_model == DEMO_SDXL_NAME, "the model loaded when Stop came is kept"
    _assert_stopped_and_recorded(batches.status(job["started"]["id"]))


def _fifo(tmp_path) -> str:
    path = tmp_path / "batch.csv"
    os.mkfifo(path)
    return str(path)


def test_hostile_files_are_refused_with_messages(tmp_path):
    with pytest.raises(UserError, match="not a regular file"):
        read_batch_file(_fifo(tmp_path))  # would block open() forever
    big = tmp_path / "big.csv"
    big.write_text("prompt\n" + "x" * 2_000_000)
    with pytest.raises(UserError, match="at most 1000000 bytes"):
        read_batch_file(big)
    bad = {
        "prompt\n" + "a cat\n" * 501: "501 rows; at most 500",
        "prompt,loras\na cat,style.safetensors:nan\n": "Row 1, column loras",
        '[{"prompt": "a", "loras": [{"name": "s", "weight": NaN}]}]': "Row 1, column loras",
        '[{"prompt": "a"}, {"prompt": "b", "guidance": Infinity}]': "Row 2, column guidance",
        "prompt,steps\na cat,2\na dog,151\n": "Row 2, column steps: Steps 151",
        "prompt,colour\na cat,red\n": "Row 1: unknown column colour",
        "prompt,seed\na cat,1.5\n": "Row 1, column seed",
        "prompt,width\n,64\n": "Row 1, column prompt: The prompt is empty",
        '{"rows": 3}': "list of rows",
        "": "no rows",
    }
    for text, message in bad.items():
        with pytest.raises(UserError, match=message):
            parse_batch(text, defaults=_defaults(), base_seed=0)


def test_a_refused_batch_starts_nothing(manager, tmp_path):
    runner = _runner(manager, tmp_path)
    with pytest.raises(UserError, match="column steps"):
        runner.start("prompt,steps\na,0\n")
    with pytest.raises(UserError, match="base seed"):
        runner.start("prompt\na\n", base_seed=float("nan"))
    assert runner.status()["state"] == "idle" and not (tmp_path / "outputs").exists()


def test_a_batch_waiting_in_the_queue_is_seen_and_stopped_by_its_id(manager, tmp_path):
    """Review 9 #15: a queued batch has its id at once; /batch_status shows it waiting, /batch_stop and the
    page's Stop ("" = the newest waiting) take it out of the queue, and it never runs."""
    from modules.generate.batch_section import BatchSection

    batches = _runner(manager, tmp_path)
    queue = JobRunner(JobStore(tmp_path / "queue.sqlite"), tick_s=0.05)
    section = BatchSection(batches, queue=queue)
    text = "prompt,steps\na cat,1\n"
    with queue.device_lent("a measurement") as lent:  # the device is held: the batches wait in line
        assert lent
        first, second = section.submit(text, base_seed=1), section.submit(text, base_seed=2)
    assert first["state"] == second["state"] == "queued" and first["id"] and first["id"] != second["id"]
    assert (section.status(first["id"])["state"], section.status("")["id"]) == ("waiting", second["id"])
    stopped = section.stop("")
    assert (stopped["id"], stopped["state"]) == (second["id"], "stopped")
    assert section.stop(first["id"])["state"] == "stopped"
    assert {queue.store.get(job["queue_id"]).state for job in (first, second)} == {"cancelled"}
    queue.tick()
    assert batches.status()["state"] == "idle", "a stopped batch ran"
