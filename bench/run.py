"""Benchmarks, each measured side by side in one run: ``.venv/bin/python bench/run.py``.

Prints a table and writes ``bench/results.json``:

1. training step overhead: our full step vs a bare PEFT reference step on the same U-Net
2. time to first step and a phase breakdown of a small end-to-end run
3. caching: one epoch with latent + text caches vs without
4. generate overhead: ModelManager with a LoRA vs a direct diffusers call with the same LoRA
5. peak memory (RSS) of our training step vs the reference step, each in its own process

Tiny demo models on the CPU (``--resolution`` sets the image size). A full-size SDXL
benchmark on a GPU is not written yet.
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


def _build_workspace(root: Path) -> dict:
    from core.demo_models import DEMO_SDXL_NAME, ensure_demo_models
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
    return {"models": models, "projects": root / "projects", "model": DEMO_SDXL_NAME, "prepare": timings}


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
    )
    trainer.setup()
    return trainer


class ReferenceStep:
    """The bare loop: PEFT LoRA on the same U-Net, one forward, one backward, one optimizer step."""

    def __init__(self, model_dir: Path, *, rank: int) -> None:
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig

        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        self.unet.train()
        self.scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        side = RESOLUTION // 2
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(1, 4, side, side, generator=generator)
        self.text = torch.randn(1, 77, self.unet.config.cross_attention_dim, generator=generator)
        pooled = self.unet.config.projection_class_embeddings_input_dim - 6 * self.unet.config.addition_time_embed_dim
        self.pooled = torch.randn(1, pooled, generator=generator)
        self.time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        noise = torch.randn_like(self.latents)
        timesteps = torch.randint(0, 1000, (1,))
        noisy = self.scheduler.add_noise(self.latents, noise, timesteps)
        prediction = self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=self.text,
            added_cond_kwargs={"text_embeds": self.pooled, "time_ids": self.time_ids},
        ).sample
        F.mse_loss(prediction, noise).backward()
        self.optimizer.step()
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
    from core.demo_models import demo_model_paths

    trainer = _trainer(workspace, root / "loras-step")
    counter = {"step": 0}

    def ours():
        trainer._step(counter["step"])
        counter["step"] += 1

    reference = ReferenceStep(demo_model_paths(workspace["models"]).sdxl_folder, rank=RANK)
    for _ in range(3):
        ours()
        reference.step()
    seconds = _time_blocks({"ours": ours, "reference": reference.step}, blocks=7, per_block=8)
    return {
        "ours_s": seconds["ours"],
        "reference_s": seconds["reference"],
        "ratio": seconds["ours"] / seconds["reference"],
    }


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
    from modules.lora_training.train import Trainer

    started = time.perf_counter()
    trainer = Trainer(
        _train_config(workspace, steps=20, name="e2e", also_save_webui=True),
        projects_dir=workspace["projects"],
        models_dir=workspace["models"],
        loras_dir=root / "loras-e2e",
        on_event=lambda event: None,
        should_stop=lambda: False,
        resume=False,
    )
    trainer.setup()
    shutil.rmtree(workspace["projects"] / "bench" / "checkpoints", ignore_errors=True)
    trainer.run()
    phases = {**workspace["prepare"], **trainer.timings}
    return {
        "time_to_first_step_s": trainer.timings["load"] + trainer.timings["cache"] + trainer.timings["first_step"],
        "phases_s": phases,
        "training_total_s": time.perf_counter() - started,
    }


def bench_generate(workspace: dict, root: Path) -> dict:
    import torch

    from core.demo_models import demo_model_paths
    from core.model_manager import GenerationRequest, LoraChoice, ModelManager
    from tests.lora_files import write_diffusers_lora

    loras = root / "loras-generate"
    folder = demo_model_paths(workspace["models"]).sdxl_folder
    write_diffusers_lora(folder, loras / "bench.safetensors", family="sdxl")
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
    from diffusers import StableDiffusionXLPipeline

    direct = StableDiffusionXLPipeline.from_pretrained(folder)
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
        "model": "demo-tiny-sdxl-RANDOM-WEIGHTS",
    }
    if part == "ours":
        trainer = _trainer(workspace, Path(tempfile.mkdtemp()))
        step = trainer._step
    else:
        from core.demo_models import demo_model_paths

        reference = ReferenceStep(demo_model_paths(workspace["models"]).sdxl_folder, rank=RANK)

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="training image side (multiple of 64)")
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
    try:
        workspace = _build_workspace(root)
        results = {
            "device": "cpu",
            "resolution": RESOLUTION,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "step_overhead": bench_step_overhead(workspace, root),
            "caching": bench_caching(workspace, root),
            "end_to_end": bench_end_to_end(workspace, root),
            "generate": bench_generate(workspace, root),
            "memory": bench_memory(root),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=2))
    rows = [
        ("training step: ours / bare PEFT step", results["step_overhead"], "s"),
        ("epoch: uncached / cached", results["caching"], ""),
        ("generate: ModelManager / direct diffusers", results["generate"], "s"),
        ("peak RSS: ours / reference (MiB)", results["memory"], ""),
    ]
    print(f"{'measure':45} {'ratio':>7}  details")
    for label, data, _ in rows:
        details = ", ".join(f"{k} {v:.4g}" for k, v in data.items() if k != "ratio")
        print(f"{label:45} {data['ratio']:7.3f}  {details}")
    e2e = results["end_to_end"]
    print(f"{'time to first step (s)':45} {e2e['time_to_first_step_s']:7.2f}")
    print("phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in e2e["phases_s"].items()))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
