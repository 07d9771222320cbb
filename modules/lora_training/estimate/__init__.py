"""Before training: peak memory and seconds per step for the chosen settings, from one entry point.

:func:`estimate_run` is what the run log, the Estimate button, the CLI and the bench call, so they
give the same figures for the same settings. The parts:

- :mod:`.work` counts one micro-batch's work on the meta device (operations, FLOPs, bytes, and the
  activations autograd keeps);
- :mod:`.memory` adds weights, LoRA, gradients and optimizer states from the safetensors headers;
- :mod:`.vae_decode` counts what decoding a sample image adds;
- :mod:`.step_time` replays the counted work on the device to time a step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from core.model_files import ModelEntry


@dataclass(frozen=True)
class RunEstimate:
    memory: object  # a .memory.MemoryEstimate
    step_time: object | None  # a .step_time.StepTimeEstimate, when timing was asked for
    notes: tuple[str, ...] = ()  # work beside the steps (class images)

    def describe(self) -> str:
        lines = [self.memory.describe()]
        if self.step_time is not None:
            lines.append(self.step_time.describe())
        return "\n\n".join([*lines, *self.notes])


@dataclass(frozen=True)
class _ConfigPlan:
    """What an estimate needs to know about a config: the model, its LoRA layers, device and dtype."""

    entry: ModelEntry
    targets: tuple[str, ...]
    device: str
    device_bytes: int | None
    weight_dtype: object
    compute_dtype: object


class CountedSteps:
    """The step work counted so far, by model and settings, for one server: counting a full-size step on the
    meta device takes 10-30 s, and an Estimate followed by Train (whose log estimates again) or a Resume
    asks for the same count. A model file changed in place is counted again (its size and time are in the key)."""

    def __init__(self, *, keep: int = 16) -> None:
        self._lock = threading.Lock()
        self._counted: dict[tuple, object] = {}
        self._counting: dict[tuple, threading.Lock] = {}  # one per key being counted: a second asker waits
        self.keep = keep
        self.counts = 0  # how many steps were really counted

    def work(self, key: tuple, count):
        with self._lock:
            if key in self._counted:
                return self._counted[key]
            counting = self._counting.setdefault(key, threading.Lock())
        with counting:  # Estimate and the run's log asking at once: one counts, the other takes its result
            with self._lock:
                if key in self._counted:
                    return self._counted[key]
            try:
                work = count()
            except BaseException:
                with self._lock:
                    self._counting.pop(key, None)
                raise
            with self._lock:
                self._counting.pop(key, None)
                self.counts += 1
                if len(self._counted) >= self.keep:
                    self._counted.pop(next(iter(self._counted)))
                self._counted[key] = work
        return work


def estimate_run(
    config, *, models_dir: Path, resolution: int, timing: bool = True, counted: CountedSteps | None = None
) -> RunEstimate:
    """Peak memory of training ``config`` at ``resolution`` (activations counted on the meta device)
    and, with ``timing``, seconds per optimizer step measured on the device training would use (this
    runs kernels there: leave it out while another job holds the device). ``counted`` keeps the counts
    of earlier calls with the same model and settings."""
    from modules.lora_training.estimate.work import count_step_work

    plan = _plan(config, models_dir=Path(models_dir))
    settings = {
        "targets": plan.targets,
        "rank": config.rank,
        "batch": config.batch_size,
        "side": resolution,
        "gradient_checkpointing": config.gradient_checkpointing,
        "network": config.network,
        "factor": config.factor,
    }

    def count():
        return count_step_work(plan.entry, models_dir=models_dir, **settings)

    work = count() if counted is None else counted.work((*_model_key(plan.entry), *settings.items()), count)
    memory = _memory(config, plan=plan, work=work, models_dir=Path(models_dir), resolution=resolution)
    step_time = _step_time(config, plan=plan, work=work, models_dir=Path(models_dir)) if timing else None
    return RunEstimate(memory=memory, step_time=step_time, notes=_regularization_notes(config) + _variant_notes(config))


def _model_key(entry) -> tuple:
    """The model's path with the size and time of the files the count reads (the single file, or the
    folder's index and the denoiser's config and weights), so that a model replaced in place is counted again."""
    from families import family as model_family

    path = Path(entry.path)
    files = [path]
    if not entry.single_file:
        files = [path / "model_index.json", *sorted((path / model_family(entry.family).denoiser_attr).glob("*"))]
    stamps = []
    for file in files:
        info = file.stat()
        stamps.append((file.name, info.st_size, info.st_mtime_ns))
    return (str(path), tuple(stamps))


def _text_encoders_stay(config) -> bool:
    """Whether training keeps the text encoders on the device: text embeddings not cached, a trained text
    encoder, or caption variants (shuffle, tag dropout), which the run caches only when they are few enough
    (counted here as kept: with ordinary tag captions they are too many)."""
    from modules.lora_training.caption_variants import variants_on

    varied = variants_on(shuffle=config.shuffle_caption, dropout=config.tag_dropout)
    return not config.cache_text_embeddings or config.train_text_encoder or varied


def _variant_notes(config) -> tuple[str, ...]:
    from modules.lora_training.caption_variants import variants_on

    if not config.cache_text_embeddings or not variants_on(shuffle=config.shuffle_caption, dropout=config.tag_dropout):
        return ()
    return (
        "Caption shuffle or tag dropout: the text encoders are counted on the device, as the run keeps them there "
        "unless every caption variant can be cached (its log says which).",
    )


def _regularization_notes(config) -> tuple[str, ...]:
    """What class images add: more steps for the same epochs, and rendering or encoding them once."""
    if not config.reg_ratio:
        return ()
    more = "" if config.steps else f"; a run set by epochs takes {1 / (1 - config.reg_ratio):.2f}x the steps"
    if config.reg_images_dir:
        once = "the folder's class images are cropped and encoded once"
    else:
        once = (
            f"{config.reg_count} class images are rendered once by the base model ({config.sample_steps} "
            "sampling steps each, like a sample image; kept for reuse) and encoded once"
        )
    return (f"Regularization: {config.reg_ratio:.0%} of the micro-batches are class images{more}; {once}.",)


def _plan(config, *, models_dir: Path) -> _ConfigPlan:
    from core.model_files import model_entry
    from core.model_manager import pick_device
    from families import family as model_family
    from modules.lora_training.estimate.memory import detected_device
    from modules.lora_training.train import choose_precision

    entry = model_entry(models_dir, config.base_model)
    family = model_family(entry.family)
    targets = family.target_modules(config.lora_targets)
    device, device_bytes = detected_device()
    device = pick_device(config.device) if config.device != "auto" else device
    precision = choose_precision(config.mixed_precision, device, family=entry.family)
    return _ConfigPlan(
        entry=entry,
        targets=targets,
        device=device,
        device_bytes=device_bytes,
        weight_dtype=precision.weight_dtype,
        compute_dtype=precision.autocast_dtype or precision.weight_dtype,
    )


def _memory(config, *, plan: _ConfigPlan, work, models_dir: Path, resolution: int):
    from modules.lora_training.estimate.memory import estimate_memory
    from modules.lora_training.estimate.work import components_folder

    scale = plan.compute_dtype.itemsize / 4  # counted at 4 bytes per value
    # The backward pass briefly holds gradients beside the kept tensors: about two of the largest.
    activation_bytes = int((work.activation_bytes + 2 * work.largest_activation) * scale)
    components = components_folder(plan.entry, models_dir)
    resident, text_adapters = _resident_parts(config, plan=plan, components=components, resolution=resolution)
    sample_bytes = 0
    if config.sample_every_steps != 0:  # None: every 10% of the run
        from modules.lora_training.estimate.vae_decode import vae_decode_bytes

        vae_weights, decode = vae_decode_bytes(components, width=resolution, height=resolution)
        sample_bytes = decode + (0 if "VAE" in resident else vae_weights)
    return estimate_memory(
        entry=plan.entry,
        rank=config.rank,
        targets=plan.targets,
        optimizer=config.optimizer,
        resolution=resolution,
        batch_size=config.batch_size,
        gradient_checkpointing=config.gradient_checkpointing,
        weight_bytes=plan.weight_dtype.itemsize,
        quantization=config.base_quantization,
        device=plan.device,
        device_bytes=plan.device_bytes,
        activation_bytes=activation_bytes,
        sample_bytes=sample_bytes,
        ema=config.ema,
        network=config.network,
        factor=config.factor,
        resident=resident,
        text_adapter_values=text_adapters,
    )


def _resident_parts(config, *, plan: _ConfigPlan, components: Path, resolution: int) -> tuple[dict[str, int], int]:
    """Frozen parts training keeps on the device beside the denoiser ({part: bytes}) and the adapter values
    of the text encoders' LoRA. Encoding a batch (latents not cached) happens before the denoiser's forward,
    so it counts like a sample: where it exceeds the training activations."""
    from functools import partial

    from families import family as model_family
    from modules.lora_training.estimate.frozen_parts import text_encoder_parts, vae_encode_bytes
    from modules.lora_training.estimate.memory import adapter_values

    kind = model_family(plan.entry.family)
    parts, text_adapters = {}, 0
    if _text_encoders_stay(config):
        trained = kind.text_encoder_attrs_with_lora() if config.train_text_encoder else ()
        parts["text encoders"], text_adapters = text_encoder_parts(
            components,
            encoders=kind.text_encoder_attrs,
            with_lora=trained,
            targets=kind.text_encoder_targets,
            weight_bytes=plan.weight_dtype.itemsize,
            adapter_values=partial(adapter_values, rank=config.rank, network=config.network, factor=config.factor),
        )
    if not config.cache_latents:
        parts["VAE"], parts["VAE encode"] = vae_encode_bytes(components, side=resolution, batch=config.batch_size)
    return parts, text_adapters


def _step_time(config, *, plan: _ConfigPlan, work, models_dir: Path):
    from modules.lora_training.estimate.step_time import estimate_step_seconds, measure_device, measure_host_seconds

    speed = measure_device(plan.device, plan.compute_dtype)
    host = measure_host_seconds(
        plan.entry,
        models_dir=models_dir,
        targets=plan.targets,
        rank=config.rank,
        gradient_checkpointing=config.gradient_checkpointing,
        optimizer=config.optimizer,
        speed=speed,
        network=config.network,
        factor=config.factor,
    )
    return estimate_step_seconds(work, speed, host_seconds=host, micro_batches=config.gradient_accumulation)
