"""Benchmarks, each measured side by side in one run: ``.venv/bin/python bench/run.py``.

Prints a table and writes ``bench/results.json``:

1. training step overhead: our full step vs a bare PEFT reference step on the same denoiser
2. time to first step and a phase breakdown of a small end-to-end run
3. caching: one epoch with latent + text caches vs without
4. generate overhead: ModelManager with a LoRA vs a direct diffusers call with the same LoRA
5. peak memory (RSS) of our training step vs the reference step, each in its own process

The bench measures the first registered family (:data:`families.FAMILY_NAMES`). Tiny demo models
on the CPU (``--resolution`` sets the image size). ``--gpu`` instead trains the family's full-size
model (random weights, 1024², its smallest preset) on a CUDA GPU and reports peak VRAM and s/step
against the tab's predictions (bench/full_size.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGES = 8
RESOLUTION = int(os.environ.get("LORA_STUDIO_BENCH_RESOLUTION", "64"))
RANK = 16


def bench_family():
    from families import FAMILY_NAMES, family

    return family(FAMILY_NAMES[0])


def _build_workspace(root: Path) -> dict:
    from model_formats.demo_models import ensure_demo_models
    from modules.lora_training.config import PrepareConfig, config_from_dict
    from modules.lora_training.dataset.prepare import prepare
    from tests.image_folders import noise_image

    models = root / "models"
    paths = ensure_demo_models(models)
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for index in range(IMAGES):
        side = RESOLUTION * 3 // 2
        noise_image(side + 8 * index, side, seed=index).save(photos / f"p{index}.png")
    timings = {}
    events = []

    def record(event):
        events.append((time.perf_counter(), event))

    started = time.perf_counter()
    prepare(
        config_from_dict(
            PrepareConfig,
            {
                "project": "bench",
                "images_dir": str(photos),
                "trigger": "ohwx",
                "resolution": RESOLUTION,
                "captioner": "florence2",
                "caption_model": str(paths.florence_folder),
            },
        ),
        projects_dir=root / "projects",
        models_dir=models,
        on_event=record,
    )
    caption_start = next((t for t, e in events if getattr(e, "stage", "") == "caption"), time.perf_counter())
    timings["validate+crop"] = caption_start - started
    timings["caption"] = time.perf_counter() - caption_start
    return {"models": models, "projects": root / "projects", "model": bench_family().demo_name, "prepare": timings}


def _train_config(workspace: dict, **options):
    from modules.lora_training.config import TrainConfig, config_from_dict

    values = {
        "project": "bench",
        "base_model": workspace["model"],
        "rank": RANK,
        "alpha": float(RANK),
        "optimizer": "adamw",
        "mixed_precision": "fp32",
        "steps": 100_000,
        "also_save_webui": False,
    }
    values.update(options)
    return config_from_dict(TrainConfig, values)


def _trainer(workspace: dict, loras: Path, **options):
    from modules.lora_training.train import Trainer

    trainer = Trainer(
        _train_config(workspace, **options),
        projects_dir=workspace["projects"],
        models_dir=workspace["models"],
        loras_dir=loras,
        on_event=lambda event: None,
        should_stop=lambda: False,
        resume=False,
        new_run=True,  # a bench measures; it never continues an earlier run
    )
    trainer.setup()
    return trainer


class ReferenceStep:
    """The bare loop: PEFT LoRA on the same denoiser, one forward, one backward, one optimizer step.

    fp32 on the CPU; on a GPU, fp16 weights with fp32 LoRA under autocast and a GradScaler,
    the same numerics as our fp16 mode. Inputs and target are drawn once, shaped by the family.
    """

    def __init__(self, model_dir: Path, *, rank: int, device: str = "cpu", resolution: int = RESOLUTION) -> None:
        import torch
        from peft import LoraConfig

        from core.model_files import model_entry
        from families import family
        from modules.lora_training.estimate.work import latent_geometry

        self.device = device
        half = device == "cuda"
        model_dir = Path(model_dir)
        entry = model_entry(model_dir.parent, model_dir.name)
        kind = family(entry.family)
        model_class, config = kind.denoiser_blueprint(entry, models_dir=model_dir.parent)
        self.model = model_class.from_pretrained(
            model_dir, subfolder=kind.denoiser_attr, torch_dtype=torch.float16 if half else torch.float32
        ).to(device)
        self.model.requires_grad_(False)
        self.model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(kind.attention_targets)))
        params = [p for p in self.model.parameters() if p.requires_grad]
        for param in params:
            param.data = param.data.float()
        if half:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.scaler = torch.amp.GradScaler("cuda") if half else None
        downscale, text_length = latent_geometry(entry, model_dir.parent)
        generator = torch.Generator().manual_seed(0)
        self.inputs = kind.meta_inputs(
            config,
            batch=1,
            latent_side=resolution // downscale,
            text_length=text_length,
            make=lambda *shape: torch.randn(*shape, generator=generator).to(device),
        )
        with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=half):
            self.target = torch.randn_like(self.model(**self.inputs)[0].float())

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        with torch.autocast(self.device, dtype=torch.float16, enabled=self.scaler is not None):
            prediction = self.model(**self.inputs)[0]
            loss = F.mse_loss(prediction.float(), self.target)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def _time_blocks(functions: dict, *, blocks: int, per_block: int) -> dict[str, float]:
    """Median seconds per call, alternating the functions block by block so drift hits all alike."""
    samples = {name: [] for name in functions}
    for _ in range(blocks):
        for name, function in functions.items():
            started = time.perf_counter()
            for _ in range(per_block):
                function()
            samples[name].append((time.perf_counter() - started) / per_block)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_step_overhead(workspace: dict, root: Path) -> dict:
    from model_formats.demo_models import demo_model_paths

    trainer = _trainer(workspace, root / "loras-step")
    counter = {"step": 0}

    def ours():
        trainer._step(counter["step"])
        counter["step"] += 1

    reference = ReferenceStep(demo_model_paths(workspace["models"]).folders[bench_family().name], rank=RANK)
    for _ in range(3):
        ours()
        reference.step()
    seconds = _time_blocks({"ours": ours, "reference": reference.step}, blocks=7, per_block=8)
    return {
        "ours_s": seconds["ours"],
        "reference_s": seconds["reference"],
        "ratio": seconds["ours"] / seconds["reference"],
        "config": trainer.config,
    }


def bench_step_estimate(workspace: dict, *, config, measured_s: float) -> dict:
    """The tab's s/step prediction for the config just measured, against the measurement."""
    from modules.lora_training.estimate import estimate_run

    estimate = estimate_run(config, models_dir=workspace["models"], resolution=RESOLUTION).step_time
    return {
        "predicted_s": estimate.seconds_per_step,
        "measured_s": measured_s,
        "replayed_share": estimate.replayed_share,
        "ratio": estimate.seconds_per_step / measured_s,
    }


def caching_by_counted_flops(side: int = 1024) -> dict:
    """For the bench family's full-size architecture: what the caches remove, by counted FLOPs (no weights).

    The step is the LoRA training forward + backward of the denoiser; without caches each step also
    runs the VAE encoder on the image (text encoders are negligible next to it).
    """
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from core.model_files import ModelEntry
    from modules.lora_training.estimate.work import count_step_work

    kind = bench_family()
    folder = kind.full_size_config_folder(Path(tempfile.mkdtemp()))
    entry = ModelEntry(name=folder.name, path=folder, family=kind.name, single_file=False)
    targets = kind.attention_targets
    results = {}
    for checkpointing in (False, True):
        work = count_step_work(
            entry,
            models_dir=folder.parent,
            targets=targets,
            rank=RANK,
            batch=1,
            side=side,
            gradient_checkpointing=checkpointing,
        )
        results["step_tflop" + ("_checkpointing" if checkpointing else "")] = work.total_flops / 1e12
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        with FlopCounterMode(display=False) as counter:
            vae.encode(torch.empty(1, 3, side, side))
    results["vae_encode_tflop"] = counter.get_total_flops() / 1e12
    results["ratio"] = (results["step_tflop"] + results["vae_encode_tflop"]) / results["step_tflop"]
    results["ratio_checkpointing"] = (results["step_tflop_checkpointing"] + results["vae_encode_tflop"]) / results[
        "step_tflop_checkpointing"
    ]
    return results


def bench_caching(workspace: dict, root: Path) -> dict:
    results = {}
    for label, cached in (("cached", True), ("uncached", False)):
        trainer = _trainer(workspace, root / f"loras-{label}", cache_latents=cached, cache_text_embeddings=cached)
        per_epoch = trainer.stream.per_epoch
        trainer._step(0)  # warm-up
        started = time.perf_counter()
        for step in range(1, 1 + per_epoch):
            trainer._step(step)
        results[label] = time.perf_counter() - started
    return {
        "epoch_cached_s": results["cached"],
        "epoch_uncached_s": results["uncached"],
        "ratio": results["uncached"] / results["cached"],
    }


def bench_end_to_end(workspace: dict, root: Path) -> dict:
    started = time.perf_counter()
    trainer = _trainer(workspace, root / "loras-e2e", steps=20, name="e2e", also_save_webui=True)
    trainer.run()
    phases = {**workspace["prepare"], **trainer.timings}
    return {
        "time_to_first_step_s": trainer.timings["load"] + trainer.timings["cache"] + trainer.timings["first_step"],
        "phases_s": phases,
        "training_total_s": time.perf_counter() - started,
    }


def bench_validation(workspace: dict, root: Path) -> tuple[dict, dict]:
    """Validation with the defaults (10% of the images held out, a checkpoint every 10% of the run): one
    validation's seconds over the seconds of training between two checkpoints, in the same run. Then the
    Evaluate job on that run (validation, the prompt panel rendered, CLIP figures, the grid): its seconds per
    measured checkpoint over the same training seconds."""
    import time

    from modules.lora_training.evaluate import evaluate_run

    # The defaults: 10 epochs (steps unset), a checkpoint every 10% of the run, 10% of the images held out.
    trainer = _trainer(workspace, root / "loras-validation", steps=None, name="validation", save_every_steps=None)
    trainer.run()
    validations = len(trainer.evaluation.records)
    per_validation = trainer.timings["validation"] / validations
    per_interval = trainer.timings["train"] / (trainer.total_steps / trainer.save_every)
    validation = {
        "ratio": per_validation / per_interval,
        "validation_s": per_validation,
        "training_between_checkpoints_s": per_interval,
        "validations": validations,
        "held_out_images": len(trainer.held_out),
    }
    measured = []
    started = time.perf_counter()
    evaluate_run(
        "bench",
        projects_dir=workspace["projects"],
        models_dir=workspace["models"],
        run_id=trainer.current_run.run_id,
        device="cpu",
        on_record=measured.append,
    )
    per_checkpoint = (time.perf_counter() - started) / len(measured)
    evaluation = {
        "ratio": per_checkpoint / per_interval,
        "evaluation_s": per_checkpoint,
        "training_between_checkpoints_s": per_interval,
        "measured": len(measured),
        "clip": float(measured[-1].get("subject_similarity") is not None),
    }
    return validation, evaluation


def bench_generate(workspace: dict, root: Path) -> dict:
    import torch

    from core.model_manager import GenerationRequest, LoraChoice, ModelManager
    from model_formats.demo_models import demo_model_paths
    from tests.lora_files import write_diffusers_lora

    loras = root / "loras-generate"
    folder = demo_model_paths(workspace["models"]).folders[bench_family().name]
    write_diffusers_lora(folder, loras / "bench.safetensors", family=bench_family().name)
    manager = ModelManager(models_dir=workspace["models"], loras_dir=loras, device="cpu")
    request = GenerationRequest(
        model=workspace["model"],
        prompt="ohwx, a photo",
        steps=10,
        width=RESOLUTION,
        height=RESOLUTION,
        seed=1,
        loras=(LoraChoice("bench.safetensors", 0.8),),
    )
    from diffusers import DiffusionPipeline

    direct = DiffusionPipeline.from_pretrained(folder)
    direct.set_progress_bar_config(disable=True)
    direct.load_lora_weights(str(loras / "bench.safetensors"), adapter_name="bench")
    direct.set_adapters(["bench"], adapter_weights=[0.8])

    def ours():
        manager.generate(request)

    def reference():
        with torch.inference_mode():
            direct(
                prompt=request.prompt,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                width=RESOLUTION,
                height=RESOLUTION,
                generator=torch.Generator().manual_seed(1),
            )

    ours()
    reference()
    seconds = _time_blocks({"ours": ours, "reference": reference}, blocks=7, per_block=2)
    return {
        "ours_s": seconds["ours"],
        "reference_s": seconds["reference"],
        "ratio": seconds["ours"] / seconds["reference"],
    }


def _peak_rss_of(part: str, workspace_root: Path) -> float:
    """Peak resident memory (MiB) of a child process running one kind of step."""
    done = subprocess.run(
        [sys.executable, __file__, "--memory-part", part, "--workspace", str(workspace_root)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def _memory_part(part: str, workspace_root: Path) -> None:
    workspace = {
        "models": workspace_root / "models",
        "projects": workspace_root / "projects",
        "model": bench_family().demo_name,
    }
    if part == "ours":
        trainer = _trainer(workspace, Path(tempfile.mkdtemp()))
        step = trainer._step
    else:
        from model_formats.demo_models import demo_model_paths

        reference = ReferenceStep(demo_model_paths(workspace["models"]).folders[bench_family().name], rank=RANK)

        def step(_index):
            reference.step()

    step(0)
    _reset_peak_rss()
    for index in range(1, 11):
        step(index)
    print(json.dumps({"peak_mib": _peak_rss_kib() / 1024}))


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_memory(workspace_root: Path) -> dict:
    ours = _peak_rss_of("ours", workspace_root)
    reference = _peak_rss_of("reference", workspace_root)
    return {"ours_peak_mib": ours, "reference_peak_mib": reference, "ratio": ours / reference}


def _print_results(results: dict) -> None:
    """The ratios as a table, then the time to the first step and its phases."""
    full_size_label = f"full-size {bench_family().display_name}, counted FLOPs: uncached / cached"
    rows = [
        ("training step: ours / bare PEFT step", results["step_overhead"], "s"),
        ("s/step: tab's estimate / measured", results["step_estimate"], ""),
        ("epoch: uncached / cached", results["caching"], ""),
        (full_size_label, results["caching_full_size_by_flops"], ""),
        ("validation / training since the last checkpoint", results["validation"], "s"),
        ("evaluate job per checkpoint / training between", results["evaluation"], "s"),
        ("generate: ModelManager / direct diffusers", results["generate"], "s"),
        ("peak RSS: ours / reference (MiB)", results["memory"], ""),
    ]
    print(f"{'measure':50} {'ratio':>7}  details")
    for label, data, _ in rows:
        details = ", ".join(f"{k} {v:.4g}" for k, v in data.items() if k != "ratio")
        print(f"{label:50} {data['ratio']:7.3f}  {details}")
    e2e = results["end_to_end"]
    print(f"{'time to first step (s)':50} {e2e['time_to_first_step_s']:7.2f}")
    print("phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in e2e["phases_s"].items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="training image side (multiple of 64)")
    parser.add_argument("--gpu", action="store_true", help="the full-size model at 1024² on a CUDA GPU")
    parser.add_argument("--preset", help="preset for --gpu (default: the family's smallest)")
    parser.add_argument("--memory-part", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--workspace", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolution != RESOLUTION:
        # Child processes and module constants read it from the environment.
        os.environ["LORA_STUDIO_BENCH_RESOLUTION"] = str(args.resolution)
        return subprocess.call([sys.executable, __file__, *sys.argv[1:]], env=os.environ)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.memory_part:
        _memory_part(args.memory_part, args.workspace)
        return 0
    root = Path(tempfile.mkdtemp(prefix="lora-studio-bench-"))
    if args.gpu:
        return _gpu_main(root, args)
    try:
        workspace = _build_workspace(root)
        step_overhead = bench_step_overhead(workspace, root)
        step_config = step_overhead.pop("config")
        results = {
            "device": "cpu",
            "resolution": RESOLUTION,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "step_overhead": step_overhead,
            "step_estimate": bench_step_estimate(workspace, config=step_config, measured_s=step_overhead["ours_s"]),
            "caching": bench_caching(workspace, root),
            "caching_full_size_by_flops": caching_by_counted_flops(),
            "end_to_end": bench_end_to_end(workspace, root),
            **dict(zip(("validation", "evaluation"), bench_validation(workspace, root), strict=True)),
            "generate": bench_generate(workspace, root),
            "memory": bench_memory(root),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=2))
    _print_results(results)
    print(f"results written to {args.out}")
    return 0


def _gpu_main(root: Path, args) -> int:
    from bench.full_size import run_gpu_bench

    resolution = args.resolution if args.resolution != 64 else 1024
    try:
        result = run_gpu_bench(
            root, family_name=bench_family().name, resolution=resolution, preset=args.preset, reference=ReferenceStep
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = args.out.with_name("results-gpu.json") if args.out.name == "results.json" else args.out
    out.write_text(json.dumps(result, indent=2))
    print(
        f"{result['device_name']}: full-size {bench_family().display_name} (random weights), "
        f"{result['resolution']}², preset {result['preset']}"
    )
    print(
        f"peak VRAM: predicted {result['predicted_peak_gib']:.2f} GiB, measured {result['measured_peak_gib']:.2f} GiB"
        f" (context {result['context_gib']:.2f} + reserved {result['training_peak_reserved_gib']:.2f};"
        f" allocated {result['training_peak_allocated_gib']:.2f}; setup peak {result['setup_peak_reserved_gib']:.2f})"
        f", error {result['estimate_error']:+.1%}"
    )
    print(f"s/step: predicted {result['predicted_s_per_step']:.3f}, measured {result['measured_s_per_step']:.3f}")
    overhead = result["step_overhead"]
    print(
        f"training step, ours / bare PEFT step (fp16, checkpointing): {overhead['ratio']:.3f}"
        f" ({overhead['ours_s']:.3f} s vs {overhead['reference_s']:.3f} s)"
    )
    print("predicted parts (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in result["predicted_parts_gib"].items()))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
