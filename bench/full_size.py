"""The GPU part of the bench: a full-size model with random weights, trained with a memory preset.

``bench/run.py --gpu`` builds the bench family's full-size architecture from its offline config
(``family.full_size_config_folder``) with random weights (nothing to download), saves it as a
diffusers folder and trains a LoRA on it through the app's own code path with the chosen preset,
measuring peak VRAM and s/step against the tab's predictions. :func:`measure_training` runs on the CPU too (that is how
the test suite checks this code on the tiny model); VRAM figures exist only on CUDA.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

GIB = 2**30


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are created in ``dtype``: no fp32 copy of the weights, ever."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _components(config_folder: Path) -> dict[str, tuple[str, str]]:
    """model_index.json's components: name → (library, class name)."""
    index = json.loads((Path(config_folder) / "model_index.json").read_text(encoding="utf-8"))
    return {
        name: tuple(spec)
        for name, spec in index.items()
        if isinstance(spec, list) and len(spec) == 2 and all(isinstance(part, str) for part in spec)
    }


def random_models(config_folder: Path) -> dict[str, torch.nn.Module]:
    """Every model component of ``config_folder`` with random weights, on the current default device and dtype."""
    import diffusers
    import transformers

    models = {}
    for name, (library, class_name) in _components(config_folder).items():
        folder = Path(config_folder) / name
        if library == "diffusers" and issubclass(cls := getattr(diffusers, class_name), diffusers.ModelMixin):
            models[name] = cls.from_config(cls.load_config(folder))
        elif library == "transformers" and issubclass(
            cls := getattr(transformers, class_name), transformers.PreTrainedModel
        ):
            models[name] = cls(transformers.AutoConfig.from_pretrained(folder))
    return models


def build_random_pipeline(config_folder: Path, out_folder: Path, *, device: str, dtype: torch.dtype, seed: int = 0):
    """A diffusers folder at ``out_folder`` with the architecture of ``config_folder``, random weights."""
    import diffusers
    import transformers

    from core.atomic import atomic_path

    config_folder = Path(config_folder)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        parts = {name: model.eval() for name, model in random_models(config_folder).items()}
    for name, (library, class_name) in _components(config_folder).items():
        if name not in parts:  # tokenizers and schedulers
            parts[name] = getattr(diffusers if library == "diffusers" else transformers, class_name).from_pretrained(
                config_folder / name
            )
    index = json.loads((config_folder / "model_index.json").read_text(encoding="utf-8"))
    # Components a folder declares absent ([null, null], e.g. a safety checker) and its flags.
    absent = {name: None for name, spec in index.items() if spec == [None, None]}
    flags = {name: value for name, value in index.items() if isinstance(value, bool)}
    pipe = getattr(diffusers, index["_class_name"])(**parts, **absent, **flags)
    with atomic_path(Path(out_folder)) as tmp:
        pipe.save_pretrained(tmp)
    del pipe, parts
    if device == "cuda":
        torch.cuda.empty_cache()
    return Path(out_folder)


def _prepare_project(root: Path, *, models_dir: Path, resolution: int, images: int) -> Path:
    from modules.lora_training.config import PrepareConfig, config_from_dict
    from modules.lora_training.dataset.prepare import prepare
    from tests.image_folders import noise_image

    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        noise_image(resolution + 16 * index, resolution, seed=index).save(photos / f"p{index}.png")
    values = {"project": "bench", "images_dir": str(photos), "trigger": "ohwx", "resolution": resolution}
    prepare(
        config_from_dict(PrepareConfig, {**values, "captioner": "none"}),
        projects_dir=root / "projects",
        models_dir=models_dir,
    )
    return root / "projects"


def _cuda_peak(reset: bool = False) -> dict:
    if reset:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return {}
    torch.cuda.synchronize()
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def _timed_steps(trainer, *, steps: int, on_gpu: bool, warm_up: int = 2) -> tuple[list[float], dict]:
    """Seconds of each step after ``warm_up`` untimed ones, and the GPU peak over the timed ones."""
    for step in range(warm_up):
        trainer._step(step)
    if on_gpu:
        _cuda_peak(reset=True)
    seconds = []
    for step in range(warm_up, steps):
        started = time.perf_counter()
        trainer._step(step)
        if on_gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds, _cuda_peak() if on_gpu else {}


def _gpu_memory(*, context: int, setup_peak: dict, steps_peak: dict) -> dict:
    return {
        "device_name": torch.cuda.get_device_name(0),
        "context_gib": context / GIB,
        "setup_peak_reserved_gib": setup_peak["reserved"] / GIB,
        "training_peak_allocated_gib": steps_peak["allocated"] / GIB,
        "training_peak_reserved_gib": steps_peak["reserved"] / GIB,
        # What the card shows in use while training: the context plus the allocator's pool.
        "measured_peak_gib": (context + steps_peak["reserved"]) / GIB,
    }


def _bench_config(preset: str, *, model: str, device: str):
    """The shipped preset's options on ``model``, without samples or checkpoints in the measured steps."""
    from modules.lora_training.config import TrainConfig, config_from_dict
    from modules.lora_training.preset_files import read_preset

    options = {**read_preset(preset)["options"], "save_every_steps": 0, "sample_every_steps": 0}
    values = {"project": "bench", "base_model": model, "steps": 1000, "device": device, "also_save_webui": False}
    return config_from_dict(TrainConfig, {**options, **values})


def measure_training(
    models_dir: Path,
    model: str,
    *,
    work_dir: Path,
    preset: str,
    resolution: int,
    device: str,
    steps: int = 10,
    make_reference=None,
) -> dict:
    """Train ``steps`` steps of a LoRA on ``model`` with ``preset``; predicted and measured memory and time.

    With ``make_reference`` (building a bare step on the same U-Net), also our step against it, side by side.
    """
    from modules.lora_training.estimate import estimate_run
    from modules.lora_training.train import Trainer

    projects = _prepare_project(work_dir, models_dir=models_dir, resolution=resolution, images=4)
    config = _bench_config(preset, model=model, device=device)
    on_gpu = device == "cuda"
    if on_gpu:
        free, total = torch.cuda.mem_get_info()
        context = total - free  # the CUDA context (and anything else already on the card)
    predicted = estimate_run(config, models_dir=models_dir, resolution=resolution)

    trainer = Trainer(
        config,
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=work_dir / "loras",
        on_event=lambda event: None,
        should_stop=lambda: False,
        resume=False,
        new_run=True,
    )
    if on_gpu:
        _cuda_peak(reset=True)
    trainer.setup()
    setup_peak = _cuda_peak() if on_gpu else {}
    seconds, steps_peak = _timed_steps(trainer, steps=steps, on_gpu=on_gpu)
    result = {
        "model": model,
        "preset": preset,
        "resolution": resolution,
        "device": device,
        "precision": trainer.precision.label,
        "predicted_s_per_step": predicted.step_time.seconds_per_step,
        "measured_s_per_step": statistics.median(seconds),
        "predicted_peak_gib": predicted.memory.total_bytes / GIB,
        "predicted_parts_gib": {name: size / GIB for name, size in predicted.memory.parts.items()},
    }
    if on_gpu:
        result.update(_gpu_memory(context=context, setup_peak=setup_peak, steps_peak=steps_peak))
        result["estimate_error"] = result["predicted_peak_gib"] / result["measured_peak_gib"] - 1
    if make_reference is not None:
        # Built only now, so that its weights do not count in the peak measured above.
        result["step_overhead"] = _step_overhead(trainer, make_reference(), first_step=steps, device=device)
    return result


def _step_overhead(trainer, reference, *, first_step: int, device: str) -> dict:
    """Our full step against the bare reference step, alternating blocks, medians."""
    counter = {"step": first_step}

    def ours():
        trainer._step(counter["step"])
        counter["step"] += 1

    def timed(function) -> float:
        started = time.perf_counter()
        for _ in range(3):
            function()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / 3

    reference.step()
    samples = {"ours": [], "reference": []}
    for _ in range(5):
        samples["ours"].append(timed(ours))
        samples["reference"].append(timed(reference.step))
    ours_s, reference_s = statistics.median(samples["ours"]), statistics.median(samples["reference"])
    return {"ours_s": ours_s, "reference_s": reference_s, "ratio": ours_s / reference_s}


def run_gpu_bench(
    work_dir: Path, *, family_name: str, resolution: int = 1024, preset: str | None = None, reference=None
) -> dict:
    """The family's full-size model (random weights) on the CUDA GPU, trained with ``preset`` (default: the
    family's smallest) at ``resolution``."""
    from families import family

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU; none is visible to torch.")
    kind = family(family_name)
    preset = preset or kind.smallest_preset
    models = Path(work_dir) / "models"
    config = kind.full_size_config_folder(models)
    model = models / f"{config.name}-random"
    started = time.perf_counter()
    build_random_pipeline(config, model, device="cuda", dtype=torch.float16)
    built_s = time.perf_counter() - started
    result = measure_training(
        models,
        model.name,
        work_dir=Path(work_dir) / "run",
        preset=preset,
        resolution=resolution,
        device="cuda",
        make_reference=(lambda: reference(model, rank=16, device="cuda", resolution=resolution)) if reference else None,
    )
    result["build_model_s"] = built_s
    return result
