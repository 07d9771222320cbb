"""Opt-in full-size smoke run: ``.venv/bin/python bench/real_size.py [--family NAME|all]``.

Builds a family's full-size model with random weights in bf16 from its offline config folder
(``family.full_size_config_folder``, ``bench/full_size.py``; on the GPU when there is one, else
the CPU), then goes through the app's own code path: prepare a small
project, ``train()`` a few steps in bf16 with gradient checkpointing, cached latents and text
embeddings and a sample image along the way, save the LoRA and its webui copy, and render one
image with the LoRA through the Generate tab's ``ModelManager``. Prints wall time and peak
memory per phase (RSS; VRAM on CUDA) and s/step against the tab's estimate.

A family that trains full size on a quantized base (``family.full_size_quantization``) runs
when this machine's RAM can hold its bf16 weights while they load; otherwise it prints what it
would need. Not part of ``./test.sh``: the smallest folder alone is ~7 GB and the run takes tens
of minutes on a CPU. Everything lives in a
temporary folder, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
IMAGES = 2
RANK = 16
PROMPT = "ohwx, a photo"
# Python, torch and the 512² activations on top of the weights, when judging whether a model fits.
RUNTIME_MARGIN_BYTES = 4 * GIB


# ----- measuring ----------------------------------------------------------------------
@dataclass
class Phase:
    seconds: float = 0.0
    peak_rss: int = 0
    peak_vram: int | None = None


class Meter:
    """Wall time and peak memory per phase: :meth:`close` ends the phase that ran since the last call."""

    def __init__(self, device: str) -> None:
        self.on_cuda = device == "cuda"
        self.phases: dict[str, Phase] = {}
        self.restart()

    def restart(self) -> None:
        import torch

        from bench.run import _reset_peak_rss

        _reset_peak_rss()
        if self.on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()

    def close(self, name: str) -> Phase:
        import torch

        from bench.run import _peak_rss_kib

        if self.on_cuda:
            torch.cuda.synchronize()
        phase = self.phases.setdefault(name, Phase())
        phase.seconds += time.perf_counter() - self.started
        phase.peak_rss = max(phase.peak_rss, _peak_rss_kib() * 1024)
        if self.on_cuda:
            phase.peak_vram = max(phase.peak_vram or 0, torch.cuda.max_memory_reserved())
        self.restart()
        return phase


class TrainEvents:
    """train()'s events, as they come: each one closes the phase that led to it."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.current = "setup (load + cache + LoRA)"
        self.step_seconds: list[float] = []
        self.losses: list[float] = []
        self.trainer_timings: dict[str, float] = {}
        self.failed: str | None = None
        self.warnings: list[str] = []
        self.samples: list[Path] = []
        self.lora_path: Path | None = None

    def __call__(self, event) -> None:
        from modules.lora_training.events import Failed, Finished, Log, SampleSaved, StepDone

        if isinstance(event, StepDone):
            self.meter.close("train steps")
            self.step_seconds.append(event.s_per_step)
            self.losses.append(event.loss)
            self.current = "checkpoint + save + export" if event.step == event.total_steps else "train steps"
        elif isinstance(event, SampleSaved):
            self.meter.close("sample")
            self.samples.append(Path(event.path))
        else:
            self.meter.close(self.current)
        if isinstance(event, Log) and event.message.startswith("Time spent:"):
            self.trainer_timings = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", event.message)}
        elif isinstance(event, Log) and event.level != "info":
            self.warnings.append(event.message)
        elif isinstance(event, Failed):
            self.failed = event.message
        elif isinstance(event, Finished):
            self.lora_path = Path(event.lora_path)
        print(f"  [{time.strftime('%H:%M:%S')}] {event}", flush=True)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so the next phase's peak RSS is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _ram_bytes() -> tuple[int, int]:
    """(total, available) RAM of this machine."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


# ----- building the models ------------------------------------------------------------
def build_full_size(kind, models: Path, *, device: str) -> str:
    """The family's full-size model with random bf16 weights, as a diffusers folder in ``models``."""
    import torch

    from bench.full_size import build_random_pipeline

    config = kind.full_size_config_folder(models)
    name = f"{config.name}-random"
    build_random_pipeline(config, models / name, device=device, dtype=torch.bfloat16)
    return name


def requirement(kind) -> dict[str, int]:
    """Bytes the family's full-size model needs, counted on the meta device: each part, the load peak and
    the steady state with its base quantized."""
    import torch

    from bench.full_size import random_models
    from modules.lora_training.quantize import is_quantized_weight, quantized_bytes

    mode = kind.full_size_quantization
    with tempfile.TemporaryDirectory() as folder, torch.device("meta"):
        parts = random_models(kind.full_size_config_folder(Path(folder)))
    sizes = {name: sum(p.numel() for p in module.parameters()) * 2 for name, module in parts.items()}
    sizes["vae"] *= 2  # the VAE is kept in fp32
    quantized = sum(
        quantized_bytes(tuple(p.shape), mode)
        if is_quantized_weight(name, blocks=kind.quantized_blocks) and p.dim() == 2
        else p.numel() * 2
        for name, p in parts[kind.denoiser_attr].named_parameters()
    )
    total, available = _ram_bytes()
    others = sum(size for name, size in sizes.items() if name != kind.denoiser_attr)
    sizes.update(
        denoiser_quantized=quantized,
        # The trainer loads every part in bf16, then quantizes the denoiser as it places it.
        load_peak=sum(sizes[name] for name in parts) + RUNTIME_MARGIN_BYTES,
        after_quantization=quantized + others,
        ram_total=total,
        ram_available=available,
    )
    return sizes


def describe_requirement(kind, sizes: dict[str, int]) -> str:
    gib = {name: value / GIB for name, value in sizes.items()}
    mode = kind.full_size_quantization.upper()
    not_parts = {kind.denoiser_attr, "vae", "denoiser_quantized", "load_peak", "after_quantization", "ram_total"}
    others = ", ".join(f"{name} {gib[name]:.2f}" for name in sizes if name not in not_parts | {"ram_available"})
    return (
        f"{kind.display_name} needs about {gib['load_peak']:.1f} GiB of RAM to load: {kind.denoiser_attr} "
        f"{gib[kind.denoiser_attr]:.1f} GiB in bf16 before {mode} quantization ({mode}: "
        f"{gib['denoiser_quantized']:.1f} GiB), {others}, VAE {gib['vae']:.2f} (fp32), plus "
        f"{RUNTIME_MARGIN_BYTES / GIB:.0f} for the runtime; {gib['after_quantization']:.1f} GiB stay resident after "
        f"quantization. Building the random folder needs the same RAM and "
        f"{(sizes['load_peak'] - RUNTIME_MARGIN_BYTES) / 1e9:.0f} GB of disk. This machine has "
        f"{gib['ram_total']:.1f} GiB ({gib['ram_available']:.1f} available)."
    )


# ----- the run ------------------------------------------------------------------------
def _train_config(kind, *, model: str, args, device: str):
    from modules.lora_training.config import TrainConfig, config_from_dict

    values = {
        "project": "bench",
        "base_model": model,
        "steps": args.steps,
        "mixed_precision": "bf16",
        "rank": RANK,
        "alpha": float(RANK),
        "gradient_checkpointing": True,
        "cache_latents": True,
        "cache_text_embeddings": True,
        "sample_every_steps": 2,
        "sample_steps": args.sample_steps,
        "also_save_webui": True,
        "device": device,
    }
    values["base_quantization"] = kind.full_size_quantization
    return config_from_dict(TrainConfig, values)


def _estimates(config, *, models: Path, resolution: int) -> dict:
    from modules.lora_training.estimate import estimate_run

    estimate = estimate_run(config, models_dir=models, resolution=resolution)
    return {"s_per_step": estimate.step_time.seconds_per_step, "peak_bytes": estimate.memory.total_bytes}


def _generate(models: Path, loras: Path, *, model: str, lora: Path, args, device: str, meter: Meter):
    from core.model_manager import GenerationRequest, LoraChoice, ModelManager
    from families import family

    manager = ModelManager(models_dir=models, loras_dir=loras, device=device)
    manager.load_model(model)
    meter.close("generate: load")
    request = GenerationRequest(
        model=model,
        prompt=PROMPT,
        steps=args.sample_steps,
        guidance=family(manager.loaded_family).default_guidance,
        width=args.resolution,
        height=args.resolution,
        seed=1,
        loras=(LoraChoice(lora.name, 1.0),),
    )
    image = manager.generate(request).image
    meter.close("generate: LoRA + image")
    manager.unload()
    return image


def run_family(kind, *, root: Path, args, device: str) -> dict:
    """Build, prepare, estimate, train, generate; every phase measured."""
    from bench.full_size import _prepare_project
    from modules.lora_training.train import train

    models, work = root / "models", root / kind.name
    meter = Meter(device)
    model = _tiny_model(kind.name, models) if args.tiny else build_full_size(kind, models, device=device)
    _release_freed_memory()
    meter.close("build (random weights, bf16)")
    projects = _prepare_project(work, models_dir=models, resolution=args.resolution, images=IMAGES)
    config = _train_config(kind, model=model, args=args, device=device)
    meter.close("prepare")
    result = {
        "family": kind.name,
        "model": model,
        "device": device,
        "estimate": _estimates(config, models=models, resolution=args.resolution),
    }
    meter.close("estimate (tab)")
    events = TrainEvents(meter)
    result["events"] = events
    try:
        train(config, projects_dir=projects, models_dir=models, loras_dir=work / "loras", on_event=events)
        if events.lora_path is None:
            raise RuntimeError(f"training did not finish: {events.failed}")
        result["webui_copy"] = (work / "loras" / "webui" / events.lora_path.name).is_file()
        _release_freed_memory()
        meter.restart()
        image = _generate(
            models, work / "loras", model=model, lora=events.lora_path, args=args, device=device, meter=meter
        )
        image.save(work / "generated.png")
        result["images"] = {"generated": describe_image(image)}
        result["images"].update({f"sample {path.name}": describe_image(path) for path in events.samples})
    except Exception:
        result["failure"] = traceback.format_exc()
    result["phases"] = meter.phases
    return result


def describe_image(image) -> str:
    """Size and pixel spread: random weights draw noise, a NaN or blank output draws one flat colour."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.open(image)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    flat = " (FLAT: NaN or blank output)" if pixels.std() < 1 else ""
    return f"{image.width}x{image.height}, pixel mean {pixels.mean():.1f}, std {pixels.std():.1f}{flat}"


def _tiny_model(family: str, models: Path) -> str:
    """The demo models instead of full size: checks this script in seconds."""
    from model_formats.demo_models import ensure_demo_models

    paths = ensure_demo_models(models)
    return paths.folders[family].name


# ----- report -------------------------------------------------------------------------
def _gib(value: int | None) -> str:
    return "" if value is None else f"{value / GIB:.2f}"


def print_report(result: dict, *, args) -> None:
    import torch

    events: TrainEvents = result["events"]
    phases: dict[str, Phase] = result["phases"]
    title = f"{result['family'].upper()} {result['model']}, {args.resolution}², bf16, rank {RANK}, {args.steps} steps"
    print(f"\n== {title} on {result['device']} (torch {torch.__version__}, {torch.get_num_threads()} threads) ==")
    print(f"{'phase':32} {'seconds':>9} {'peak RSS GiB':>13} {'peak VRAM GiB':>14}")
    for name, phase in phases.items():
        print(f"{name:32} {phase.seconds:9.1f} {_gib(phase.peak_rss):>13} {_gib(phase.peak_vram):>14}")
    total = sum(phase.seconds for phase in phases.values())
    peak_rss = max(phase.peak_rss for phase in phases.values())
    print(f"{'total':32} {total:9.1f} {_gib(peak_rss):>13}")
    if events.trainer_timings:
        print("trainer's own timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in events.trainer_timings.items()))
    estimate = result["estimate"]
    if events.step_seconds:
        later = events.step_seconds[1:] or events.step_seconds
        measured = statistics.median(later)
        print(
            f"s/step: measured {measured:.2f} (median of steps 2-{len(events.step_seconds)}; first step "
            f"{events.step_seconds[0]:.2f}), tab's estimate {estimate['s_per_step']:.2f}"
            f" (estimate / measured {estimate['s_per_step'] / measured:.2f})"
        )
        steps = phases["train steps"]
        memory = steps.peak_vram if steps.peak_vram is not None else steps.peak_rss
        print(
            f"peak {'VRAM' if steps.peak_vram is not None else 'RSS'} during the steps: {memory / GIB:.2f} GiB; tab's "
            f"estimate {estimate['peak_bytes'] / GIB:.2f} GiB (denoiser weights, LoRA, optimizer, activations)"
        )
        print("losses: " + ", ".join(f"{loss:.4f}" for loss in events.losses))
    for warning in events.warnings:
        print(f"warning: {warning}")
    for name, note in result.get("images", {}).items():
        print(f"{name}: {note}")
    if "webui_copy" in result:
        print(f"webui copy written: {'yes' if result['webui_copy'] else 'NO'}")
    if "failure" in result:
        print("FAILED:\n" + result["failure"])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from families import FAMILY_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=(*FAMILY_NAMES, "all"), default=FAMILY_NAMES[0])
    parser.add_argument("--resolution", type=int, default=512, help="training and image side (multiple of 64)")
    parser.add_argument("--steps", type=int, default=3, help="training steps (a sample is rendered at step 2)")
    parser.add_argument("--sample-steps", type=int, default=4, help="denoising steps of the sample and the image")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--workdir", type=Path, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the demo models: checks the script
    return parser.parse_args(argv)


def _fits(kind) -> bool:
    sizes = requirement(kind)
    fits = sizes["load_peak"] <= sizes["ram_available"]
    verdict = "runs. " if fits else "skipped, it does not fit. "
    print(f"{kind.display_name}: {verdict}" + describe_requirement(kind, sizes))
    return fits


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    args = _parse(argv)
    from families import FAMILY_NAMES, family

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="lora-studio-real-size-", dir=args.workdir))
    failed = False
    try:
        for name in FAMILY_NAMES if args.family == "all" else (args.family,):
            kind = family(name)
            if kind.full_size_quantization != "none" and not args.tiny and not _fits(kind):
                continue
            result = run_family(kind, root=root, args=args, device=device)
            print_report(result, args=args)
            failed = failed or "failure" in result
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
