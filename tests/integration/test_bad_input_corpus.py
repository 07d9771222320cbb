"""The bad-input corpus: what a careless user or a hostile local process sends, through the API and the CLI.

One app (started by run.sh) serves the whole corpus. For every kind of bad input the test checks that the
answer names the field or file and says what to do, that ``/training_status`` keeps answering within a
second (a poller measures it all along), that nothing changes outside the folders the case may write, and
at the end that no LoRA, checkpoint or source image was lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_config
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME
from tests.image_folders import noise_image, png_header_only
from tests.server import running_app

pytestmark = pytest.mark.slow

SDXL = DEMO_SDXL_NAME
QUICK = {"steps": 3, "rank": 4, "save_every_steps": 0, "sample_every_steps": 0}
LONG = {"steps": 5000, "rank": 4, "save_every_steps": 0, "sample_every_steps": 0}
NO_LORAS = (None, 1.0) * 4
ARTIFACTS = ROOT / "test-artifacts"


def _error_text(data: str) -> str:
    """The message of a Gradio error event (``{"error": "...", ...}``, a JSON string, or raw text)."""
    try:
        value = json.loads(data)
    except ValueError:
        return data
    return str(value.get("error") if isinstance(value, dict) else value)


@dataclass
class World:
    """The running app and the folders it serves, with the state every case must leave intact."""

    url: str
    client: object
    root: Path
    config: Path
    photos: Path
    latencies: list[tuple[float, bool]] = field(default_factory=list)  # (seconds, CPU contended then)
    answers: list[str] = field(default_factory=list)  # what each case got, for test-artifacts/

    def folder(self, name: str) -> Path:
        return self.root / name

    # ----- sending ---------------------------------------------------------------------------------
    def refused(self, api: str, *args) -> str:
        """The error the API answers with (a call that is accepted fails the case's pattern).

        Sent as raw JSON through Gradio's REST route, because hostile callers send what gradio_client
        never would (NaN, Infinity)."""
        kind, data = self.call(api, list(args))
        if kind == "error":
            return data
        self.wait_idle()
        return f"ACCEPTED: {data}"

    def call(self, api: str, args: list, *, timeout: float = 120) -> tuple[str, str]:
        """POST ``/gradio_api/call/<api>`` and read its event stream: ("complete" | "error", data)."""
        body = json.dumps({"data": args}).encode()  # NaN and Infinity go out as JavaScript literals
        post = urllib.request.Request(
            f"{self.url}gradio_api/call/{api}", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(post, timeout=30) as answer:
            event_id = json.loads(answer.read())["event_id"]
        kind = ""
        with urllib.request.urlopen(f"{self.url}gradio_api/call/{api}/{event_id}", timeout=timeout) as stream:
            for raw in stream:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: ") and kind in ("complete", "error"):
                    data = line[len("data: ") :]
                    return kind, _error_text(data) if kind == "error" else data
        return "error", "the event stream ended without a result"

    def job_message(self, api: str, *args) -> str:
        """Start a job that should run, and return its final message and log (skips are reported there)."""
        from gradio_client.exceptions import AppError

        try:
            self.client.predict(*args, api_name=f"/{api}")
        except AppError as exc:
            return f"REFUSED: {exc}"
        status = self.wait_idle()
        return "\n".join([status["state"], status.get("message") or "", *status["log"]])

    def status(self) -> dict:
        """``/training_status`` over plain HTTP (not queued), timed."""
        started = time.monotonic()
        request = urllib.request.Request(
            f"{self.url}gradio_api/run/training_status",
            data=b'{"data": []}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            data = json.loads(answer.read())["data"][0]
        self.latencies.append((time.monotonic() - started, cpu_contended()))
        return data

    def wait_idle(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if not status["running"]:
                return status
            time.sleep(0.2)
        raise AssertionError(f"job still running after {timeout} s: {status['state']}")

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.2)
        raise AssertionError(f"timed out; last status {status['state']}: {status.get('message')}")

    def cli(self, *argv: str) -> str:
        """``python -m modules.lora_training --app-config CONFIG ARGV`` in this process: exit code and stderr."""
        from modules.lora_training.cli import main

        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(["--app-config", str(self.config), *argv])
            except SystemExit as exc:  # argparse refusing a flag's type
                code = exc.code
        return f"exit {code}: {errors.getvalue()}"


def prep(world: World, *, images=None, project="fresh", trigger="ohwx", model=SDXL, res=64, sub=False, task=None):
    images = str(world.photos) if images is None else images
    captioner = "florence2" if task else "none"  # the caption task is read only for Florence-2
    task = task or "<DETAILED_CAPTION>"
    return ("prepare_dataset", images, project, trigger, model, captioner, task, res, sub, None)


def train(world: World, *, project="keep", options=None, prepare=False, model=SDXL, images=None, new_run=False):
    images = str(world.photos) if images is None else images
    options = QUICK if options is None else options
    return ("train_lora", images, project, "ohwx", model, options, prepare, "none", 64, False, new_run)


def gen(*, model=SDXL, prompt="a cat", steps=2, guidance=5.0, width=64, height=64, seed=1, loras=NO_LORAS):
    return ("generate", model, prompt, "", steps, guidance, width, height, seed, *loras)


def one_lora(name, weight=1.0):
    return (name, weight, *NO_LORAS[2:])


@dataclass(frozen=True)
class Case:
    kind: str
    send: Callable[[World], str]
    expect: str  # names the field or file, and the fix
    cli: Callable[[World], tuple[str, ...]] | None = None
    cli_expect: str | None = None
    writes: tuple[str, ...] = ()  # folders under the app root this case may change


def refused(builder: Callable[[World], tuple]) -> Callable[[World], str]:
    return lambda world: world.refused(*builder(world))


def as_job(builder: Callable[[World], tuple]) -> Callable[[World], str]:
    return lambda world: world.job_message(*builder(world))


def cli(*argv) -> Callable[[World], tuple[str, ...]]:
    """CLI arguments; ``{root}`` and ``{photos}`` are filled in from the world."""
    return lambda world: tuple(str(a).format(root=world.root, photos=world.photos) for a in argv)


NAME_FIX = "letters, digits"
NAMES = [
    Case(
        "project: empty",
        refused(lambda w: prep(w, project="")),
        "Project name is empty.*give it a short name",
        cli("prepare", "--project", "", "--images", "{photos}", "--trigger", "x"),
    ),
    Case("project: spaces only", refused(lambda w: prep(w, project="   ")), "Project name is empty.*short name"),
    Case(
        "project: ../ traversal",
        refused(lambda w: prep(w, project="../escape")),
        "must not contain '/'",
        cli("prepare", "--project", "../escape", "--images", "{photos}", "--trigger", "x"),
    ),
    Case("project: absolute path", refused(lambda w: prep(w, project="/tmp/abs")), "must not contain '/'"),
    Case("project: backslash", refused(lambda w: prep(w, project="a\\b")), "must not contain"),
    Case("project: NUL byte", refused(lambda w: prep(w, project="a\x00b")), "control characters.*" + NAME_FIX),
    Case("project: newline", refused(lambda w: prep(w, project="a\nb")), "control characters.*" + NAME_FIX),
    Case("project: 200 characters", refused(lambda w: prep(w, project="x" * 200)), "200 characters.*at most 64"),
    Case("project: reserved device name", refused(lambda w: prep(w, project="CON")), "reserved device name.*another"),
    Case("project: hidden name", refused(lambda w: prep(w, project=".hidden")), NAME_FIX),
    Case("project: trailing dot", refused(lambda w: prep(w, project="name.")), NAME_FIX),
    Case("project: emoji", refused(lambda w: prep(w, project="cat\u2615")), NAME_FIX),
    Case("project: a number, not text", refused(lambda w: prep(w, project=12)), "project must be text"),
    Case("trigger: empty", refused(lambda w: prep(w, trigger="")), "trigger"),
    Case("trigger: newline", refused(lambda w: prep(w, trigger="oh\nwx")), "trigger"),
    Case("trigger: 500 characters", refused(lambda w: prep(w, trigger="t" * 500)), "trigger"),
    Case(
        "LoRA name: traversal",
        refused(lambda w: train(w, options={**QUICK, "name": "../../evil"})),
        "LoRA name.*must not contain",
    ),
    Case("resume: traversal", lambda w: w.refused("resume_training", "../../etc"), "must not contain"),
    Case(
        "evaluate: traversal",
        lambda w: w.refused("evaluate_lora", "../../etc", "", "validation_loss", 0.02),
        "must not contain",
        cli("evaluate", "--project", "../../etc"),
    ),
    Case(
        "evaluate: a project never trained",
        lambda w: w.refused("evaluate_lora", "nothing-here", "", "validation_loss", 0.02),
        "train it first",
    ),
    Case(
        "evaluate: a number, not text",
        lambda w: w.refused("evaluate_lora", 5, "", "validation_loss", 0.02),
        "project must be text",
    ),
    Case(
        "evaluate: an unknown best rule",
        lambda w: w.refused("evaluate_lora", "keep", "", "prettiest", 0.02),
        "best rule must be one of validation_loss, subject_similarity",
        cli("evaluate", "--project", "keep", "--best-rule", "prettiest"),
    ),
    Case(
        "evaluate: NaN margin",
        lambda w: w.refused("evaluate_lora", "keep", "", "subject_similarity", float("nan")),
        "margin a number from 0 to 1",
    ),
    Case(
        "evaluate: margin as text",
        lambda w: w.refused("evaluate_lora", "keep", "", "subject_similarity", "wide"),
        "margin a number from 0 to 1",
    ),
    Case(
        "prepare: an option that is no preparation setting",
        lambda w: w.refused(*prep(w)[:-1], {"tag_threshold": 0.5, "rm": "-rf"}),
        "not preparation settings without an input of their own: rm",
    ),
    Case(
        "prepare: NaN tag threshold",
        lambda w: w.refused(*prep(w)[:-1], {"tag_threshold": float("nan")}),
        "tag_threshold",
    ),
    Case(
        "caption tools: traversal",
        lambda w: w.refused("caption_tools", "../../etc", "frequencies", "", ""),
        "must not contain",
        cli("captions", "--project", "../../etc"),
    ),
    Case(
        "caption tools: unknown action",
        lambda w: w.refused("caption_tools", "keep", "rm -rf", "", ""),
        "action must be one of",
    ),
    Case(
        "caption tools: two tags in one",
        lambda w: w.refused("caption_tools", "keep", "add", "a, b", ""),
        "one tag, without commas",
        cli("captions", "--project", "keep", "--add", "a, b"),
    ),
    Case(
        "caption tools: remove the trigger",
        lambda w: w.refused("caption_tools", "keep", "remove", "ohwx", ""),
        "is the trigger word",
    ),
    Case(
        "caption tools: a number for the tag",
        lambda w: w.refused("caption_tools", "keep", "add", 7, ""),
        "tag must be text",
    ),
    Case(
        "caption tools: a 10,000-character suffix",
        lambda w: w.refused("caption_tools", "keep", "suffix", "", "x" * 10_000),
        "1 to 500 characters",
    ),
    Case(
        "grid: traversal",
        lambda w: w.refused("comparison_grid", "../../etc", "", "checkpoints"),
        "must not contain",
        cli("grid", "--project", "../../etc"),
    ),
    Case(
        "grid: rows that are a path",
        lambda w: w.refused("comparison_grid", "keep", "", "../../x"),
        "rows must be one of checkpoints, weights",
    ),
    Case(
        "grid: a project never trained",
        lambda w: w.refused("comparison_grid", "nothing-here", "", "weights"),
        "train it first",
    ),
    Case(
        "save checkpoint: traversal name",
        lambda w: w.refused("save_checkpoint_lora", "keep", "../../evil", -1, "", False),
        "LoRA name.*must not contain",
        cli("save-checkpoint", "--project", "keep", "--name", "../../evil"),
    ),
    Case(
        "save checkpoint: NaN step",
        lambda w: w.refused("save_checkpoint_lora", "keep", "x", float("nan"), "", False),
        "step must be a whole number",
    ),
    Case(
        "save checkpoint: 'yes' for overwrite",
        lambda w: w.refused("save_checkpoint_lora", "keep", "x", -1, "", "yes"),
        "overwrite must be true or false",
    ),
]


def answer(builder: Callable[[World], tuple]) -> Callable[[World], str]:
    """What the user sees: the refusal, or the final message and log of the job the call started."""

    def send(world: World) -> str:
        message = world.refused(*builder(world))
        if not message.startswith("ACCEPTED"):
            return message
        status = world.wait_idle()
        return "\n".join([f"job {status['state']}", status.get("message") or "", *status["log"]])

    return send


def no(text: str) -> str:
    """A pattern that fails when ``text`` appears anywhere in the message."""
    return f"^(?!.*{re.escape(text)})"


PATHS = [
    Case("folder: empty path", answer(lambda w: prep(w, images="")), "Image folder is empty: type the folder"),
    Case("folder: spaces only", answer(lambda w: prep(w, images="   ")), "Image folder is empty"),
    Case(
        "folder: does not exist",
        answer(lambda w: prep(w, images=str(w.root / "nowhere"))),
        "does not exist",
        cli("prepare", "--project", "p", "--images", "{root}/nowhere", "--trigger", "x"),
    ),
    Case(
        "folder: a file, not a folder",
        answer(lambda w: prep(w, images=str(w.photos / "p0.png"))),
        "is a file; choose the folder that holds your photos",
    ),
    Case(
        "folder: /dev",
        answer(lambda w: prep(w, images="/dev")),
        "not inside the folders this app may read.*add their folder to IMAGE_ROOTS",
    ),
    Case(
        "folder: /etc",
        answer(lambda w: prep(w, images="/etc")),
        "not inside the folders this app may read.*add their folder to IMAGE_ROOTS",
    ),
    Case(
        "folder: /proc/self",
        answer(lambda w: prep(w, images="/proc/self")),
        "not inside the folders this app may read.*IMAGE_ROOTS",
    ),
    Case(
        "folder: relative ../..",
        answer(lambda w: prep(w, images="../../..")),
        "not inside the folders this app may read.*IMAGE_ROOTS",
    ),
    Case(
        "folder: symlink leaving the roots",
        answer(lambda w: prep(w, images=str(w.root / "link_etc"))),
        "not inside the folders this app may read.*IMAGE_ROOTS",
    ),
    Case("folder: hidden", answer(lambda w: prep(w, images=str(w.root / ".secret"))), "hidden"),
    Case("folder: NUL byte in the path", answer(lambda w: prep(w, images=str(w.photos) + "\x00x")), "Image folder"),
    Case(
        "folder: 5000-character path",
        answer(lambda w: prep(w, images=str(w.root) + "/a" * 2500)),
        "Image folder|does not exist|too long",
    ),
    Case("folder: a number, not text", answer(lambda w: prep(w, images=42)), "images_dir must be a path"),
    Case("folder: empty folder", answer(lambda w: prep(w, images=str(w.root / "empty"))), "is empty: add some photos"),
    Case(
        "folder: only broken images",
        answer(lambda w: prep(w, images=str(w.root / "broken"))),
        "No usable image in .*broken: 3 file.s. skipped .not an image: 1",
    ),
    Case("folder: images only in a subfolder", answer(lambda w: prep(w, images=str(w.root / "nested"))), "subfolder"),
    Case(
        "folder: FIFO, socket, bomb and private files among photos",
        answer(lambda w: prep(w, images=str(w.root / "special"), project="special")),
        no("id_rsa") + ".*not a regular file.*(named pipe|socket)",
        writes=("projects/special",),
    ),
    Case("caption task: unknown", answer(lambda w: prep(w, task="<RUN_SHELL>")), "caption_task must be one of"),
    Case(
        "resolution: 63",
        answer(lambda w: prep(w, res=63)),
        "resolution must be between 64",
        cli("prepare", "--project", "p", "--images", "{photos}", "--trigger", "x", "--resolution", "63"),
    ),
    Case("resolution: not a multiple of 64", answer(lambda w: prep(w, res=100)), "resolution.*multiple of 64"),
    Case("resolution: 8192", answer(lambda w: prep(w, res=8192)), "resolution must be between 64 and 4096"),
    Case("resolution: NaN", answer(lambda w: prep(w, res=float("nan"))), "resolution must be a whole number"),
    Case(
        "include_subfolders: a string",
        answer(lambda w: prep(w, sub="false")),
        "include_subfolders must be true or false",
    ),
]

MODELS = [
    Case("base model: empty", answer(lambda w: train(w, model="")), "Choose a base model .put one into"),
    Case(
        "base model: unknown name", answer(lambda w: train(w, model="nope")), "nope.*not found.*pick one from the list"
    ),
    Case(
        "base model: absolute path outside models/",
        answer(lambda w: train(w, model="/etc/passwd")),
        "outside the models folder",
        cli("train", "--project", "keep", "--base-model", "/etc/passwd", "--steps", "1"),
    ),
    Case(
        "base model: ../ traversal", answer(lambda w: train(w, model="../config.json")), "outside .*models: pick a file"
    ),
    Case("base model: /dev/zero", answer(lambda w: train(w, model="/dev/zero")), "outside the models folder"),
    Case("base model: named pipe", answer(lambda w: train(w, model="pipe.safetensors")), "not a regular file"),
    Case(
        "base model: random bytes",
        answer(lambda w: train(w, model="garbage.safetensors")),
        "garbage.safetensors.*(corrupt|not a)",
    ),
    Case(
        "base model: empty file",
        answer(lambda w: train(w, model="empty.safetensors")),
        "empty.safetensors is not a readable .safetensors file.*download it again",
    ),
    Case(
        "base model: folder without model_index.json", answer(lambda w: train(w, model="nofolder")), "model_index.json"
    ),
    Case(
        "base model: symlink leaving models/",
        answer(lambda w: train(w, model="escape.safetensors")),
        "outside .*models: pick a file",
    ),
    Case(
        "base model: a LoRA file",
        answer(lambda w: train(w, model="lora_as_model.safetensors")),
        "lora_as_model.safetensors.*(LoRA|not a base model)",
    ),
]


def option(**changes) -> Callable[[World], str]:
    """Training on the prepared project ``keep`` with QUICK options changed."""
    return answer(lambda w: train(w, options={**QUICK, **changes}))


NAN, INF = float("nan"), float("inf")
NUMBERS = [
    Case(
        "steps: 0",
        option(steps=0),
        "steps must be between 1 and 1000000",
        cli("train", "--project", "keep", "--base-model", SDXL, "--steps", "0"),
    ),
    Case("steps: negative", option(steps=-5), "steps must be between 1"),
    Case("steps: ten million", option(steps=10**7), "steps must be between 1 and 1000000"),
    Case("steps: 1.5", option(steps=1.5), "steps must be a whole number"),
    Case(
        "steps: a word",
        option(steps="ten"),
        "steps must be a whole number",
        cli("train", "--project", "keep", "--base-model", SDXL, "--steps", "ten"),
        cli_expect="argument --steps: invalid int value: 'ten'",
    ),
    Case("steps: NaN", option(steps=NAN), "steps must be a whole number; got nan"),
    Case(
        "learning rate: NaN",
        option(learning_rate=NAN),
        "learning_rate must be a finite number",
        cli("train", "--project", "keep", "--base-model", SDXL, "--learning-rate", "nan"),
    ),
    Case(
        "learning rate: Infinity",
        option(learning_rate=INF),
        "learning_rate must be a finite number",
        cli("train", "--project", "keep", "--base-model", SDXL, "--learning-rate", "inf"),
    ),
    Case("learning rate: negative", option(learning_rate=-1.0), "learning_rate must be between"),
    Case("learning rate: a string", option(learning_rate="1e-4"), "learning_rate must be a number"),
    Case("rank: 0", option(rank=0), "rank must be between 1 and 1024"),
    Case(
        "rank: 2000",
        option(rank=2000),
        "rank must be between 1 and 1024",
        cli("estimate", "--base-model", SDXL, "--rank", "2000"),
    ),
    Case("alpha: NaN", option(alpha=NAN), "alpha must be a finite number"),
    Case(
        "tag dropout: NaN",
        option(tag_dropout=NAN),
        "tag_dropout must be a finite number",
        cli("train", "--project", "keep", "--base-model", SDXL, "--tag-dropout", "nan"),
    ),
    Case("tag dropout: 1.5", option(tag_dropout=1.5), "tag_dropout must be between 0 and 1"),
    Case("keep tokens: 65", option(keep_tokens=65), "keep_tokens must be between 0 and 64"),
    Case("shuffle: 'yes'", option(shuffle_caption="yes"), "shuffle_caption must be true or false"),
    Case("alpha: -Infinity", option(alpha=-INF), "alpha must be a finite number"),
    Case("seed: 2**70", option(seed=2**70), "seed must be between 0 and"),
    Case("seed: a word", option(seed="abc"), "seed must be a whole number"),
    Case("batch size: 0", option(batch_size=0), "batch_size must be between 1"),
    Case("caption dropout: 1.5", option(caption_dropout=1.5), "caption_dropout must be between 0 and 1"),
    Case("noise offset: NaN", option(noise_offset=NAN), "noise_offset must be a finite number"),
    Case("max grad norm: Infinity", option(max_grad_norm=INF), "max_grad_norm must be a finite number"),
    Case("save every: negative", option(save_every_steps=-1), "save_every_steps must be between 0"),
    Case("mixed precision: fp8", option(mixed_precision="fp8"), "mixed_precision must be one of"),
    Case("optimizer: unknown", option(optimizer="sgdx"), "optimizer must be one of"),
    Case("LoRA targets: unknown", option(lora_targets="everything"), "lora_targets must be one of"),
    Case("boolean option: a string", option(flip="false"), "flip must be true or false"),
    Case("sample prompts: not a list", option(sample_prompts=5), "sample_prompts must be a list of texts"),
    Case("EMA decay: 1", option(ema=True, ema_decay=1.0), "ema_decay must be greater than 0 and less than 1"),
    Case("EMA weights: unknown", option(ema_weights="best"), "ema_weights must be one of raw, ema"),
    Case("mask floor: NaN", option(mask_floor=NAN), "mask_floor must be a finite number"),
    Case("class images share: 1", option(reg_ratio=1.0), "reg_ratio must be between 0 and 0.9"),
    Case("class images without a prompt", option(reg_ratio=0.3), "reg_ratio is set but class_prompt is empty"),
    Case(
        "class images: a folder outside IMAGE_ROOTS",
        option(reg_ratio=0.3, class_prompt="a dog", reg_images_dir="/etc"),
        "is not inside the folders this app may read",
    ),
    Case("options: unknown key", option(stepz=10), "unknown option.*stepz.*valid options"),
    Case(
        "options: a list", answer(lambda w: train(w, options=[1, 2])), "options must be an object of training options"
    ),
    Case(
        "options: a string",
        answer(lambda w: train(w, options="steps=10")),
        "options must be an object of training options",
    ),
    Case("new_run: a string", answer(lambda w: train(w, new_run="no")), "new_run must be true or false"),
]

GENERATE = [
    Case("generate steps: 0", refused(lambda w: gen(steps=0)), "Steps.*whole number between 1 and 150"),
    Case("generate steps: 100000", refused(lambda w: gen(steps=100_000)), "Steps.*whole number between 1 and 150"),
    Case("generate steps: NaN", refused(lambda w: gen(steps=NAN)), "Steps must be a whole number"),
    Case("guidance: NaN", refused(lambda w: gen(guidance=NAN)), "Guidance must be a number between 0 and 50"),
    Case("guidance: Infinity", refused(lambda w: gen(guidance=INF)), "Guidance must be a number between 0 and 50"),
    Case("guidance: a million", refused(lambda w: gen(guidance=1e6)), "Guidance must be a number between 0 and 50"),
    Case("width: 100000", refused(lambda w: gen(width=100_000)), "Width.*multiple of 8 between 64 and 2048"),
    Case("width: 65", refused(lambda w: gen(width=65)), "Width 65.*multiple of 8 between 64 and 2048"),
    Case("width: negative", refused(lambda w: gen(width=-64)), "Width -64.*multiple of 8 between 64"),
    Case("height: a word", refused(lambda w: gen(height="big")), "Height must be a whole number"),
    Case("generate seed: NaN", refused(lambda w: gen(seed=NAN)), "Seed.*must be a whole number"),
    Case("generate seed: 2**70", refused(lambda w: gen(seed=2**70)), "Seed .*whole number between"),
    Case("prompt: empty", refused(lambda w: gen(prompt="")), "prompt is empty"),
    Case(
        "prompt: a megabyte",
        refused(lambda w: gen(prompt="cat " * 250_000)),
        "prompt is 1000000 characters long; use at most 10000",
    ),
    Case("model: unknown", refused(lambda w: gen(model="nope")), "nope.*not found"),
    Case("model: absolute path", refused(lambda w: gen(model="/etc/passwd")), "is outside .*models.*pick a file"),
    Case("model: named pipe", refused(lambda w: gen(model="pipe.safetensors")), "not a regular file"),
    Case(
        "LoRA weight: NaN",
        refused(lambda w: gen(loras=one_lora("keep.safetensors", NAN))),
        "LoRA 1.*weight must be a number between -5 and 5",
    ),
    Case(
        "LoRA weight: 100",
        refused(lambda w: gen(loras=one_lora("keep.safetensors", 100))),
        "LoRA 1.*weight must be a number between -5 and 5",
    ),
    Case(
        "LoRA weight: a word",
        refused(lambda w: gen(loras=one_lora("keep.safetensors", "heavy"))),
        "LoRA 1.*weight must be a number",
    ),
    Case(
        "LoRA: unknown name", refused(lambda w: gen(loras=one_lora("nope.safetensors"))), "nope.safetensors.*not found"
    ),
    Case(
        "LoRA: ../ traversal",
        refused(lambda w: gen(loras=one_lora("../../etc/passwd"))),
        "outside .*loras.*pick a file",
    ),
    Case(
        "LoRA: random bytes",
        refused(lambda w: gen(loras=one_lora("corrupt.safetensors"))),
        "corrupt or not a LoRA file.*corrupt.safetensors",
        cli("inspect", "{root}/loras/corrupt.safetensors"),
    ),
    Case(
        "LoRA: truncated file",
        refused(lambda w: gen(loras=one_lora("truncated.safetensors"))),
        "corrupt or not a LoRA file.*truncated.safetensors",
        cli("export", "--lora", "{root}/loras/truncated.safetensors", "--format", "kohya"),
    ),
    Case(
        "LoRA: empty file",
        refused(lambda w: gen(loras=one_lora("empty.safetensors"))),
        "corrupt or not a LoRA file.*empty.safetensors",
        cli("inspect", "{root}/loras/empty.safetensors"),
    ),
    Case(
        "LoRA: 200 MB header",
        refused(lambda w: gen(loras=one_lora("bigheader.safetensors"))),
        "corrupt or not a LoRA file.*bigheader.safetensors",
        cli("inspect", "{root}/loras/bigheader.safetensors"),
    ),
    Case(
        "LoRA: a pickle",
        refused(lambda w: gen(loras=one_lora("pickle.safetensors"))),
        "corrupt or not a LoRA file.*pickle.safetensors",
        cli("inspect", "{root}/loras/pickle.safetensors"),
    ),
    Case(
        "LoRA: named pipe",
        refused(lambda w: gen(loras=one_lora("pipe.safetensors"))),
        "not a regular file",
        cli("inspect", "{root}/loras/pipe.safetensors"),
    ),
    Case(
        "LoRA: a folder",
        refused(lambda w: gen(loras=one_lora("dir.safetensors"))),
        "not a regular file",
        cli("export", "--lora", "{root}/loras/dir.safetensors", "--format", "kohya"),
    ),
    Case(
        "LoRA: symlink leaving loras/",
        refused(lambda w: gen(loras=one_lora("escape.safetensors"))),
        "outside .*loras.*pick a file",
    ),
    Case(
        "LoRA: for another family",
        refused(lambda w: gen(loras=one_lora("flux_only.safetensors"))),
        "flux_only.safetensors.*(another model family|Flux)",
    ),
    Case(
        "LoRA: NaN weights",
        refused(lambda w: gen(loras=one_lora("nan.safetensors"))),
        "nan.safetensors.*NaN or infinite weights.*Train it again",
    ),
    Case(
        "export: existing output without --overwrite",
        lambda w: w.cli("export", "--lora", str(w.root / "loras" / "keep.safetensors"), "--format", "kohya"),
        "already exists.*--overwrite",
    ),
    Case(
        "train CLI: options file missing",
        lambda w: w.cli("train", "--project", "keep", "--config", "/nope.json"),
        "cannot read /nope.json",
    ),
    Case(
        "train CLI: options file holds a list",
        lambda w: w.cli("train", "--project", "keep", "--config", str(w.root / "list.json")),
        "must hold a JSON object",
    ),
    Case(
        "train CLI: options file holds NaN",
        lambda w: w.cli("train", "--project", "keep", "--base-model", SDXL, "--config", str(w.root / "nan.json")),
        "learning_rate must be a finite number",
    ),
]


def served(path: str) -> Callable[[World], str]:
    """A GET of a file route: ``refused NNN`` or what was served."""

    def send(world: World) -> str:
        try:
            with urllib.request.urlopen(world.url + path, timeout=10) as response:
                return f"SERVED {response.status}: {response.read(80)!r}"
        except urllib.error.HTTPError as exc:
            return f"refused {exc.code}"

    return send


JOBS = [
    Case(
        "resume: unknown project",
        lambda w: w.refused("resume_training", "nothing-here"),
        "no stopped run.*nothing-here|nothing-here.*no stopped run",
    ),
    Case("resume: empty name", lambda w: w.refused("resume_training", ""), "Project name is empty"),
    Case("resume: a finished project", lambda w: w.refused("resume_training", "keep"), "no stopped run"),
    Case("stop: nothing running", lambda w: w.client.predict(api_name="/stop_training"), "No job is running"),
    Case(
        "train: project never prepared",
        answer(lambda w: train(w, project="never")),
        "never.*has no prepared images: run Prepare first",
    ),
    Case(
        "train: new run over a stopped one",
        answer(lambda w: train(w, project="paused")),
        "stopped run.*Resume.*new run",
    ),
    Case(
        "prepare again: project with a stopped run",
        answer(lambda w: prep(w, project="paused")),
        "paused has a stopped run.*Resume will continue it",
        writes=("projects/paused",),
    ),
    Case("file route: /etc/passwd", served("gradio_api/file=/etc/passwd"), "refused 4"),
    Case("file route: the app's config", served("gradio_api/file=config.json"), "refused 4"),
    Case("file route: a LoRA", served("gradio_api/file=loras/keep.safetensors"), "refused 4"),
    Case("file route: a project's crops", served("gradio_api/file=projects/keep/manifest.json"), "refused 4"),
]


def ten_generates(world: World) -> str:
    """Ten clients asking for an image at once: how many got each answer ("10 x ACCEPTED")."""
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = pool.map(lambda seed: world.refused(*gen(seed=seed)), range(10))
    counts = Counter("ACCEPTED" if answer.startswith("ACCEPTED") else answer for answer in answers)
    return "; ".join(f"{count} x {answer}" for answer, count in counts.items())


def call_and_leave(world: World, api_name: str, data: list, *, until: Callable[[], bool], timeout: float = 60) -> None:
    """POST a queued call, open its event stream, wait ``until`` the work has started, then drop the
    connection the way a closed browser tab does."""
    import http.client

    host, port = world.url.split("//")[1].rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    body = json.dumps({"data": data})
    connection.request("POST", f"/gradio_api/call/{api_name}", body=body, headers={"Content-Type": "application/json"})
    event = json.loads(connection.getresponse().read())["event_id"]
    connection.request("GET", f"/gradio_api/call/{api_name}/{event}")
    connection.getresponse()
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"{api_name} did not start within {timeout} s"
        time.sleep(0.1)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def logged(world: World, text: str) -> Callable[[], bool]:
    return lambda: text in (world.root / "app.log").read_text()


def cancellations(world: World) -> list[str]:
    pattern = r"generation cancelled at step (\d+)/150: the client disconnected"
    return re.findall(pattern, (world.root / "app.log").read_text())


def generation_left_by_its_client(world: World) -> str:
    slow = list(gen(steps=150, width=256, height=256, seed=3)[1:])
    call_and_leave(world, "generate", slow, until=logged(world, "generation started: 150 steps"))
    quick = world.refused(*gen(seed=4))
    return f"cancelled {cancellations(world)}; next: {quick}"


def generation_cancelled_by_its_client(world: World) -> str:
    job = world.client.submit(*gen(steps=150, width=256, height=256, seed=5)[1:], api_name="/generate")
    started = time.monotonic() + 60
    while (world.root / "app.log").read_text().count("generation started: 150 steps") < 2:
        assert time.monotonic() < started, "the generation did not start"
        time.sleep(0.1)
    job.cancel()
    quick = world.refused(*gen(seed=6))
    return f"cancelled {cancellations(world)}; next: {quick}"


def queued_then_cancelled(builder: Callable[[World], tuple]) -> Callable[[World], str]:
    """A job asked for while another runs: the refusal, or its place in the queue and its /queue_cancel."""

    def send(world: World) -> str:
        api, *args = builder(world)
        kind, data = world.call(api, list(args))
        if kind == "error":
            return data
        job = json.loads(data)[0]
        cancel_kind, cancelled = world.call("queue_cancel", [job["queue_id"]])
        state = json.loads(cancelled)[0]["state"] if cancel_kind == "complete" else cancelled
        return f"{job['state']} as job {job['queue_id']} at {job['position']}; {state}"

    return send


WHILE_TRAINING = [
    Case(
        "concurrency: a second train",
        queued_then_cancelled(lambda w: train(w, project="keep")),
        r"^queued as job \d+ at 1; cancelled$",
    ),
    Case(
        "concurrency: prepare the training project",
        answer(lambda w: prep(w, project="busy")),
        "busy already has a job in the queue .*running.*cancel it",
    ),
    Case(
        "concurrency: resume while running",
        queued_then_cancelled(lambda w: ("resume_training", "paused")),
        r"^queued as job \d+ at 1; cancelled$",
    ),
    Case(
        "concurrency: 10 generates while training",
        ten_generates,
        "^10 x The GPU is busy: training LoRA .busy. is in progress[^;]*$",
    ),
    Case(
        "concurrency: the client that started training leaves",
        lambda w: w.wait_for(lambda s: s["step"] >= 3, timeout=60)["state"],
        "training",
    ),
    Case(
        "concurrency: stop twice",
        lambda w: w.client.predict(api_name="/stop_training") + " | " + w.client.predict(api_name="/stop_training"),
        "Stopping.*\\| Already stopping",
    ),
]
AFTER_TRAINING = [
    Case("concurrency: 10 parallel generates", ten_generates, "^10 x ACCEPTED$", writes=("outputs",)),
    Case(
        "disconnect: the client of a generation leaves",
        generation_left_by_its_client,
        r"cancelled \['\d+'\]; next: ACCEPTED",
        writes=("outputs",),
    ),
    Case(
        "disconnect: the client cancels its generation",
        generation_cancelled_by_its_client,
        r"cancelled \['\d+', '\d+'\]; next: ACCEPTED",
        writes=("outputs",),
    ),
]


# ----- the app's folders, with hostile entries -------------------------------------------------------
def _photos(folder: Path, count: int, *, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        noise_image(80, 96, seed=seed + index).save(folder / f"p{index}.png")
    return folder


def _hostile_folders(root: Path) -> None:
    (root / "empty").mkdir()
    broken = root / "broken"
    broken.mkdir()
    (broken / "text.png").write_text("not an image")
    (broken / "zero.png").write_bytes(b"")
    good = io.BytesIO()
    noise_image(80, 80, seed=9).save(good, format="PNG")
    (broken / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    special = _photos(root / "special", 3, seed=40)
    os.mkfifo(special / "pipe.png")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(special / "sock.jpg"))
    listener.close()  # the socket file stays
    (special / "bomb.png").write_bytes(png_header_only(60_000, 60_000))
    (special / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    _photos(root / "nested" / "sub", 2, seed=50)
    _photos(root / ".secret", 2, seed=60)
    (root / "link_etc").symlink_to("/etc")
    (root / "list.json").write_text("[1, 2]")
    (root / "nan.json").write_text('{"learning_rate": NaN, "steps": 1}')


def _hostile_models_and_loras(root: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from tests.lora_files import write_diffusers_lora

    models, loras = root / "models", root / "loras"
    os.mkfifo(models / "pipe.safetensors")
    (models / "garbage.safetensors").write_bytes(os.urandom(4096))
    (models / "empty.safetensors").write_bytes(b"")
    (models / "nofolder").mkdir()
    (models / "escape.safetensors").symlink_to("/etc/passwd")
    flux_lora = write_diffusers_lora(models / DEMO_FLUX_NAME, loras / "flux_only.safetensors", family="flux")
    shutil.copy(flux_lora, models / "lora_as_model.safetensors")
    sdxl_lora = write_diffusers_lora(models / SDXL, root / "sdxl_lora.safetensors", family="sdxl", seed=3)
    tensors = load_file(sdxl_lora)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, loras / "nan.safetensors")
    data = sdxl_lora.read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (loras / "corrupt.safetensors").write_bytes(os.urandom(2048))
    (loras / "empty.safetensors").write_bytes(b"")
    (loras / "bigheader.safetensors").write_bytes(struct.pack("<Q", 200 * 2**20) + b"{" + b" " * 64)
    (loras / "pickle.safetensors").write_bytes(pickle.dumps({"lora_unet": [1.0, 2.0]}))
    os.mkfifo(loras / "pipe.safetensors")
    (loras / "dir.safetensors").mkdir()
    (loras / "escape.safetensors").symlink_to("/etc/passwd")


def _guarded_state(world: World) -> None:
    """A finished LoRA (``keep``) and a stopped run with its checkpoint (``paused``), made through the API."""
    world.client.predict(*train(world, project="keep", prepare=True)[1:], api_name="/train_lora")
    assert world.wait_idle()["state"] == "finished"
    world.client.predict(*train(world, project="paused", prepare=True, options=LONG)[1:], api_name="/train_lora")
    world.wait_for(lambda s: s["state"] == "training" and s["step"] >= 2)
    world.client.predict(api_name="/stop_training")
    assert world.wait_idle()["state"] == "stopped"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (without following links) with its kind, size and modification time."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if name.startswith(".queue.sqlite"):
                continue  # the job queue's database (its -wal/-shm files come and go) records accepted jobs only
            info = path.lstat()
            is_dir = stat.S_ISDIR(info.st_mode)
            entries[path.relative_to(root).as_posix()] = (
                (info.st_mode >> 12,) if is_dir else (info.st_mode >> 12, info.st_size, info.st_mtime_ns)
            )
    entries.pop("app.log", None)
    return entries


def guarded_hashes(root: Path) -> dict[str, str]:
    """Contents that must survive: the sources, the LoRAs, the projects' runs and checkpoints."""
    wanted = [*(root / "photos").glob("*"), *(root / "loras").glob("keep*"), *(root / "loras" / "webui").glob("*")]
    wanted += [p for p in (root / "projects").rglob("*") if p.is_file() and "runs" in p.parts]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in wanted if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, models_dir):
    from gradio_client import Client

    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(models_dir, root / "models")
    (root / "loras").mkdir()
    photos = _photos(root / "photos", 4, seed=20)
    _hostile_folders(root)
    _hostile_models_and_loras(root)
    config = write_config(root, root / "models", BUILD_DEMO_MODELS=False)
    with running_app(config, root / "app.log") as url:
        world = World(url=url, client=Client(url, verbose=False), root=root, config=config, photos=photos)
        _guarded_state(world)
        yield world


def cpu_contended() -> bool:
    """Whether runnable work waited for a CPU lately: Linux's pressure figure over the last 10 s, or else
    the 1-min load average (which lags a burst by up to a minute) above the core count."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        if float(some.split()[1].removeprefix("avg10=")) > 10.0:
            return True
    return os.getloadavg()[0] > (os.cpu_count() or 1)


POLLER = """
import json, sys, time, urllib.request
url = sys.argv[1]
while not sys.stdin.closed:
    started = time.monotonic()
    request = urllib.request.Request(url, data=b'{"data": []}', headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()
    print(time.monotonic() - started, flush=True)
    time.sleep(0.25)
"""


class StatusPoller:
    """Asks ``/training_status`` every 0.25 s from a process of its own, so the test's own work (the CLI
    runs in-process and holds this interpreter's lock) never shows as a slow server."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.thread = threading.Thread(target=self._collect, daemon=True)

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.world.latencies.append((float(line), cpu_contended()))

    def __enter__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-c", POLLER, f"{self.world.url}gradio_api/run/training_status"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.thread.join(timeout=10)


def check(world: World, case: Case) -> list[str]:
    """The problems with one case's answers through the API and the CLI (empty when all is well)."""
    before = snapshot(world.root)
    try:
        answers = [("api", case.send(world), case.expect)]
    except Exception as exc:  # noqa: BLE001 - one broken case is reported with the others
        answers = [("api", f"the test's call raised {type(exc).__name__}: {exc}", case.expect)]
    if case.cli is not None:
        answers.append(("cli", world.cli(*case.cli(world)), f"exit 2: .*error: .*({case.cli_expect or case.expect})"))
    world.status()
    problems = [f"/training_status took {s:.2f} s after the case" for s in blocked_answers(world.latencies[-1:])]
    for route, message, pattern in answers:
        world.answers.append(f"  [{route}] {case.kind}: {message.strip()[:300]!r}")
        print(world.answers[-1])
        if not re.search(pattern, message, flags=re.IGNORECASE | re.DOTALL):
            problems.append(f"{route} answer does not match {pattern!r}: {message[:400]!r}")
        if "Unexpected error" in message or "Traceback" in message:
            problems.append(f"{route} answer is a crash: {message[:400]!r}")
    after = snapshot(world.root)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    stray = [p for p in changed if not p.startswith(case.writes or ("\0",))]
    if stray:
        problems.append(f"changed outside {case.writes}: {stray[:8]}")
    return problems


def blocked_answers(latencies: list[tuple[float, bool]]) -> list[float]:
    """Status answers slower than 1 s. While runnable work waits for a CPU (other tests, other users, the
    training thread on two cores) a second can pass without the server being blocked; there a blocked
    server (a held lock, a FIFO opened with the interpreter lock held) still shows as 3 s."""
    return sorted(round(s, 2) for s, contended in latencies if s > (3.0 if contended else 1.0))


def test_bad_input_corpus(world):
    from gradio_client import Client

    sequential = NAMES + PATHS + MODELS + NUMBERS + GENERATE + JOBS
    kinds = [c.kind for c in sequential + WHILE_TRAINING + AFTER_TRAINING]
    assert len(kinds) == len(set(kinds)), "each kind once"
    guarded = guarded_hashes(world.root)
    failures = {}
    with StatusPoller(world):
        for case in sequential:
            failures[case.kind] = check(world, case)
        busy = train(world, project="busy", prepare=True, options=LONG)
        call_and_leave(world, "train_lora", list(busy[1:]), until=lambda: world.status()["project"] == "busy")
        world.wait_for(lambda s: s["state"] == "training")
        world.client = Client(world.url, verbose=False)
        for case in WHILE_TRAINING:
            failures[case.kind] = check(world, dataclasses.replace(case, writes=(*case.writes, "projects/busy")))
        assert world.wait_idle()["state"] == "stopped"
        for case in AFTER_TRAINING:
            failures[case.kind] = check(world, case)
    report = f"{len(kinds)} kinds of bad input:\n" + "\n".join(f"  {kind}" for kind in kinds)
    print("\n" + report)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bad-input-corpus.txt").write_text(report + "\n\nAnswers:\n" + "\n".join(world.answers) + "\n")
    failures = {kind: problems for kind, problems in failures.items() if problems}
    assert not failures, json.dumps(failures, indent=1)
    assert len(kinds) >= 80
    print(f"/training_status: {len(world.latencies)} answers, slowest {max(s for s, _ in world.latencies):.2f} s")
    assert not blocked_answers(world.latencies), f"/training_status was slow: {blocked_answers(world.latencies)}"
    after = guarded_hashes(world.root)
    assert {k: v for k, v in guarded.items() if after.get(k) != v} == {}, "a guarded file changed or vanished"
