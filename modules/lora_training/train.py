"""train(): one readable loop shared by every model family.

    setup  → load base model, cache latents and text embeddings, add LoRA, optimizer
    loop   → per step: micro-batches (accumulated), clip, optimizer + LR step,
             metrics, checkpoint every N steps, samples every N steps, stop check
    finish → final checkpoint, LoRA written atomically to loras/<name>.safetensors

Runs in one process or under ``accelerate launch`` / ``torchrun`` (:mod:`.distributed`: torch DDP
averages the LoRA gradients; each step's global batch is split between the processes; only
rank 0 writes files and emits events).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.atomic import remove_stale_partials
from core.errors import UserError
from core.model_files import model_entry
from core.model_manager import pick_device
from core.regular_files import UnreadableFile, load_safetensors_bounded
from families import display_name
from families import family as model_family
from modules.lora_training import checkpoints as ckpt
from modules.lora_training.caption_variants import caption_variant, describe_options, variants_on, variants_to_cache
from modules.lora_training.config import TrainConfig, config_to_dict
from modules.lora_training.data import (
    BatchStream,
    MixedStream,
    SampleRandom,
    Share,
    TrainItem,
    every_tenth,
    load_items,
    planned_steps,
)
from modules.lora_training.dataset.captions import split_tags
from modules.lora_training.dataset.masks import mask_weights
from modules.lora_training.dataset.scan import DEFAULT_LIMITS
from modules.lora_training.distributed import GradientSync, start_processes
from modules.lora_training.ema import AdapterEMA
from modules.lora_training.events import (
    CheckpointSaved,
    EventSink,
    Failed,
    Finished,
    Log,
    PrepProgress,
    RunChosen,
    SampleSaved,
    StepDone,
    Stopped,
    Validated,
    ignore_events,
)
from modules.lora_training.manifest import ProjectManifest
from modules.lora_training.metrics import keep_metrics_up_to
from modules.lora_training.optim import build_optimizer, build_scheduler
from modules.lora_training.project import ProjectPaths, read_json, write_json
from modules.lora_training.regularization import (
    class_image_folder,
    class_store,
    folder_class_images,
    render_class_images,
    rendered_items,
    rendered_set,
)
from modules.lora_training.runs import RunPaths, check_can_start, mark_finished, migrate_legacy, new_run, run_to_resume
from modules.lora_training.validation import (
    Evaluation,
    fixed_noise_loss,
    split_validation,
    training_probe,
)

log = logging.getLogger(__name__)
# How the webui copy of each adapter type is laid out, as the run log names it.
COPY_LAYOUTS = {"lora": "kohya", "dora": "kohya + dora_scale", "lokr": "LyCORIS", "loha": "LyCORIS"}

MAX_BAD_STEPS = 5
MAX_CACHE_FILE_BYTES = 4 * 2**30  # one cached latent or text embedding
# fp16's GradScaler starts high and halves its scale at each overflow: it may skip more steps in a row.
MAX_BAD_STEPS_WITH_SCALER = 20
PRODIGY_MIN_LR = 0.1
LORA_SHAPE = ("rank", "alpha", "lora_targets", "network", "factor", "train_text_encoder", "base_model")
# Shape options that checkpoints from before the option existed do not name: they trained with this value.
LORA_SHAPE_BEFORE = {"network": "lora", "factor": -1}
OOM_ADVICE = (
    "Out of GPU memory. Lower the batch size, the resolution (prepare again) or the rank; "
    "or turn on gradient checkpointing, an 8-bit optimizer and latent/text caching."
)


@dataclass(frozen=True)
class TrainResult:
    status: str  # finished | stopped | failed
    step: int
    lora_path: Path | None = None
    checkpoint: Path | None = None
    message: str = ""


@dataclass(frozen=True)
class Precision:
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    use_scaler: bool
    label: str


def choose_precision(mixed_precision: str, device: str, *, family: str) -> Precision:
    """The dtype of the frozen weights and of autocast, honoured on every device (LoRA weights stay fp32).

    "auto" is fp32 on the CPU and the family's usual half precision on a GPU
    (``auto_precision_on_gpu``). fp16/bf16 load the frozen weights in that dtype on the CPU too, so a CPU run takes
    the same code path as a GPU one.
    """
    on_gpu = device == "cuda"
    if mixed_precision == "auto":
        mixed_precision = model_family(family).auto_precision_on_gpu if on_gpu else "fp32"
    if mixed_precision == "fp32":
        return Precision(torch.float32, None, False, "fp32")
    if mixed_precision == "bf16":
        if on_gpu and not torch.cuda.is_bf16_supported():
            raise UserError("This GPU cannot compute in bf16: choose fp16 (or fp32) precision.")
        return Precision(torch.bfloat16, torch.bfloat16, False, "bf16")
    return Precision(torch.float16, torch.float16, True, "fp16 + GradScaler")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.safetensors") if p.is_file())
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _load_pixels(item: TrainItem, *, flip: bool) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(item.image_path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    tensor = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
    return tensor.flip(-1) if flip else tensor


class _Caches:
    """Latents and text embeddings on disk, keyed by content hash, model and bucket."""

    def __init__(self, family, paths: ProjectPaths, *, device: str) -> None:
        self.family = family
        self.model_key = family.model_key()
        self.text_key = family.text_cache_key()
        self.latent_dir = paths.cache / "latents"
        self.text_dir = paths.cache / "text"
        self.device = device
        self._memory: dict[Path, dict[str, torch.Tensor]] = {}

    def latent_path(self, item: TrainItem, flip: bool) -> Path:
        width, height = item.bucket
        return (
            self.latent_dir
            / f"{item.sha256[:20]}-{width}x{height}-{'flip' if flip else 'orig'}-{self.model_key}.safetensors"
        )

    def text_path(self, caption: str) -> Path:
        digest = hashlib.sha256(caption.encode()).hexdigest()[:20]
        return self.text_dir / f"{digest}-{self.text_key}.safetensors"

    def fill_latents(
        self, items: list[TrainItem], *, flips: tuple[bool, ...], on_event: EventSink, should_stop=lambda: False
    ) -> int:
        """Encode the missing latents; a Stop ends it at the next image (what is written stays cached)."""
        from safetensors.torch import save_file

        from core.atomic import atomic_path

        missing = [(item, flip) for item in items for flip in flips if not self.latent_path(item, flip).is_file()]
        if missing:
            self.family.vae.to(self.device)
            for index, (item, flip) in enumerate(missing):
                if should_stop():
                    return index
                moments = self.family.encode_image_moments(_load_pixels(item, flip=flip)[None])[0]
                with atomic_path(self.latent_path(item, flip)) as tmp:
                    save_file({"moments": moments.cpu().contiguous()}, str(tmp))
                on_event(PrepProgress(stage="caching_latents", done=index + 1, total=len(missing)))
                if index % 10 == 0:
                    on_event(Log(f"Caching latents {index + 1}/{len(missing)}"))
        return len(missing)

    def fill_text(self, captions: list[str], *, on_event: EventSink, should_stop=lambda: False) -> int:
        """Encode the missing caption embeddings; a Stop ends it at the next caption."""
        from safetensors.torch import save_file

        from core.atomic import atomic_path

        missing = sorted({c for c in captions if not self.text_path(c).is_file()})
        if missing:
            for encoder in self.family.text_encoders():
                encoder.to(self.device)
            for index, caption in enumerate(missing):
                if should_stop():
                    return index
                on_event(PrepProgress(stage="caching_text", done=index + 1, total=len(missing)))
                with torch.no_grad():
                    encoded = self.family.encode_text([caption])
                with atomic_path(self.text_path(caption)) as tmp:
                    save_file({k: v[0].float().cpu().contiguous() for k, v in encoded.items()}, str(tmp))
            on_event(Log(f"Cached text embeddings for {len(missing)} caption(s)"))
        return len(missing)

    def moments(self, item: TrainItem, flip: bool) -> torch.Tensor:
        return self._read(self.latent_path(item, flip))["moments"]

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        return self._read(self.text_path(caption))

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        """Each cache file is read from disk once per run, then served from memory."""
        if path not in self._memory:
            try:
                self._memory[path] = load_safetensors_bounded(path, max_bytes=MAX_CACHE_FILE_BYTES)
            except UnreadableFile as exc:
                raise UserError(
                    f"Cache file {path} cannot be used ({exc}); delete the project's cache folder and start again."
                ) from exc
        return self._memory[path]


class Trainer:
    """Holds the state of one run; ``run()`` executes it."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        projects_dir: Path,
        models_dir: Path,
        loras_dir: Path,
        on_event: EventSink,
        should_stop: Callable[[], bool],
        resume: bool,
        run_id: str | None = None,
        new_run: bool = False,
        image_roots: Iterable[Path] | None = None,
    ) -> None:
        self.config = config
        self.image_roots = image_roots
        self.paths = ProjectPaths.for_project(projects_dir, config.project)
        self.projects_dir = Path(projects_dir)
        self.models_dir = Path(models_dir)
        self.loras_dir = Path(loras_dir)
        self.should_stop = should_stop
        self.resume = resume
        self.run_id = run_id
        self.new_run = new_run
        self.processes = start_processes()
        self.rank, self.world = self.processes.rank, self.processes.world
        self.is_main = self.processes.is_main
        self.on_event = on_event if self.is_main else ignore_events
        self.lora_path = self.loras_dir / f"{config.output_name}.safetensors"
        self.timings: dict[str, float] = {}  # seconds per phase: load, cache, first_step, train, save

    # ----- setup ------------------------------------------------------------------
    def _may_replace(self, path: Path) -> bool:
        """A LoRA file may be replaced when overwrite is on, or by a resumed run that wrote it (same project,
        and same run when the file names one)."""
        if not path.exists() or self.config.overwrite:
            return True
        header = lora_header(path)
        written_by = header.get("lora_studio.run_id")
        same_run = written_by is None or written_by == self.current_run.run_id
        return self.resume and header.get("lora_studio.project") == self.paths.name and same_run

    def _made_by(self) -> str:
        """Who wrote the existing LoRA file, when it was another project or another run of this one."""
        header = lora_header(self.lora_path)
        project, run_id = header.get("lora_studio.project"), header.get("lora_studio.run_id")
        if project and project != self.paths.name:
            return f" (made by project {project!r})"
        if run_id and run_id != self.current_run.run_id:
            return f" (made by run {run_id} of this project)"
        return ""

    def _choose_run(self) -> RunPaths:
        """The run this training writes to: the one resumed, or a new one (refused while another can be resumed)."""
        if self.run_id is not None and not self.resume:
            raise UserError(f"Run {self.run_id!r} was named without resume: add --resume, or leave out --run.")
        if self.is_main:
            migrate_legacy(self.paths)
        self.processes.barrier()
        if self.resume:
            return run_to_resume(self.paths, self.run_id)
        if not self.new_run:
            check_can_start(self.paths)
        # Every process must use the same run: the main one's id wins.
        return RunPaths(Path(self.processes.broadcast(str(new_run(self.paths).root))))

    def _checkpoint_config(self) -> None:
        """A resumed run keeps the LoRA shape and the held-out images its checkpoint was trained with,
        whatever the caller passed."""
        latest = ckpt.latest_checkpoint(self.current_run.checkpoints)
        saved = read_json(latest / "config.json", {})
        shape = {**LORA_SHAPE_BEFORE, **{key: saved[key] for key in LORA_SHAPE if key in saved}}
        # Runs from before validation trained on every image.
        shape["validation_share"] = saved.get("validation_share", 0.0)
        changes = {key: value for key, value in shape.items() if value != getattr(self.config, key)}
        if changes:
            self.on_event(Log(f"Resuming with the checkpoint's {', '.join(sorted(changes))}", level="warning"))
            self.config = dataclasses.replace(self.config, **changes)

    def _check_before_loading(self) -> None:
        self.current_run = self._choose_run()
        self.on_event(RunChosen(self.current_run.run_id))
        if self.resume:
            self._checkpoint_config()
        self.entry = model_entry(self.models_dir, self.config.base_model)
        if not self._may_replace(self.lora_path):
            raise UserError(
                f"A LoRA named {self.lora_path.name} already exists in {self.loras_dir}{self._made_by()}. "
                "Choose another name or allow overwriting."
            )
        self.items, self.held_out = split_validation(load_items(self.paths), self.config.validation_share)
        self.probe = training_probe(self.items, count=len(self.held_out))
        manifest = ProjectManifest.read(self.paths) or ProjectManifest()
        self.resolution, self.trigger = manifest.resolution, manifest.trigger
        family = self.entry.family if self.config.family == "auto" else self.config.family
        if family != self.entry.family:
            raise UserError(
                f"Base model {self.entry.name} is {display_name(self.entry.family)}, but family {family!r} was asked for."
            )
        self.family_name = family
        self.class_folder = None  # checked now: a folder the run may not read is refused before the model loads
        if self.config.reg_ratio and self.config.reg_images_dir:
            self.class_folder = class_image_folder(self.config.reg_images_dir, roots=self.image_roots)

    def setup(self) -> None:
        self._check_before_loading()
        if self.is_main:
            for folder in (self.current_run.checkpoints, self.loras_dir):
                remove_stale_partials(folder)
        config = self.config
        self.device = pick_device(config.device)
        self.precision = choose_precision(config.mixed_precision, self.device, family=self.family_name)
        self.hash_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.base_hash = self.hash_pool.submit(sha256_file, self.entry.path)
        self.on_event(Log(f"Loading {self.entry.name} ({display_name(self.family_name)}) on {self.device}"))
        self.on_event(PrepProgress(stage="loading_model", done=0, total=0))
        clock = time.perf_counter()
        self.family = model_family(self.family_name)(
            self.entry,
            models_dir=self.models_dir,
            device=self.device,
            weight_dtype=self.precision.weight_dtype,
            base_quantization=config.base_quantization,
        )
        self.ignored_options = self.family.configure(config)
        self.class_items = self._class_images()
        self._plan_batches()
        self.save_every = every_tenth(config.save_every_steps, self.total_steps)
        self.sample_every = every_tenth(config.sample_every_steps, self.total_steps)
        self.sample_prompts = (
            [p.replace("{trigger}", self.trigger) for p in config.sample_prompts] if self.sample_every else []
        )
        self.sample_text: dict[str, dict[str, torch.Tensor]] = {}
        self.timings["load"] = time.perf_counter() - clock
        clock = time.perf_counter()
        self._fill_caches()
        self.family.place_denoiser()
        self.timings["cache"] = time.perf_counter() - clock
        self._add_lora_and_optimizer()
        self.ema = self._make_ema()
        self.skipped = 0
        self.start_step = self._resume_state() if self.resume else 0
        self.evaluation = Evaluation.read(self.current_run.evaluation, up_to_step=self.start_step)
        self.evaluation.validation_images = [item.image_path.name for item in self.held_out]
        self.evaluation.training_images = [item.image_path.name for item in self.probe]
        self.sync = GradientSync(self.family.lora_modules(), processes=self.processes)
        if self.is_main:  # written once the run has really started: a run that fails to start strands nothing
            write_json(self.current_run.training_config, config_to_dict(config))
        self.on_event(Log(self._describe_run()))
        for warning in self._setting_warnings():
            self.on_event(Log(warning, level="warning"))

    def _add_lora_and_optimizer(self) -> None:
        config = self.config
        # The LoRA's random initialisation follows the run's seed, without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.family.add_lora(
                rank=config.rank,
                alpha=config.alpha,
                targets=config.lora_targets,
                train_text_encoder=config.train_text_encoder,
                network=config.network,
                factor=config.factor,
            )
        if config.gradient_checkpointing:
            self.family.denoiser.enable_gradient_checkpointing()
        self.family.denoiser.train()
        groups = [{"params": self.family.lora_parameters("denoiser"), "lr": config.learning_rate}]
        if config.train_text_encoder:
            groups.append({"params": self.family.lora_parameters("text"), "lr": config.text_encoder_lr})
        self.trainable = [p for group in groups for p in group["params"]]
        self.optimizer = build_optimizer(config.optimizer, groups, weight_decay=config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, config, total_steps=self.total_steps)
        device_type = torch.device(self.device).type
        self.scaler = torch.amp.GradScaler(device_type) if self.precision.use_scaler else None

    def _plan_batches(self) -> None:
        """The micro-batch stream (the training images, with the class images mixed in) and the run's length."""
        config = self.config
        global_batch = config.batch_size * self.world
        streams = [
            BatchStream(
                items, batch_size=global_batch, repeats=config.repeats, seed=config.seed, shuffle=config.shuffle
            )
            if items
            else None
            for items in (self.items, self.class_items)
        ]
        self.stream = MixedStream(*streams, ratio=config.reg_ratio, seed=config.seed)
        self.total_steps = planned_steps(
            Counter(item.bucket for item in self.items).values(),
            batch_size=global_batch,
            repeats=config.repeats,
            accumulation=config.gradient_accumulation,
            epochs=config.epochs,
            steps=config.steps,
            reg_ratio=self.stream.ratio,
        )

    def _class_images(self) -> list[TrainItem]:
        """The regularization images (none when reg_ratio is 0): made by the main process, then read by all."""
        if not self.config.reg_ratio:
            return []
        if self.is_main:
            items = self._make_class_images()
        self.processes.barrier()
        return items if self.is_main else self._make_class_images()

    def _make_class_images(self) -> list[TrainItem]:
        config = self.config
        store = class_store(self.projects_dir)
        if self.class_folder is not None:
            return folder_class_images(
                self.class_folder,
                store=store / "from-folders",
                caption=config.class_prompt,
                resolution=self.resolution,
                max_image_bytes=DEFAULT_LIMITS.max_image_bytes,
                on_event=self.on_event,
                should_stop=self.should_stop,
            )
        size = Counter(item.bucket for item in self.items).most_common(1)[0][0]
        folder = rendered_set(
            store,
            model_key=self.family.model_key(),
            prompt=config.class_prompt,
            count=config.reg_count,
            size=size,
            steps=config.sample_steps,
        )
        if self.is_main:
            render_class_images(
                self.family,
                folder=folder,
                prompt=config.class_prompt,
                count=config.reg_count,
                size=size,
                steps=config.sample_steps,
                seed=config.seed,
                on_event=self.on_event,
                should_stop=self.should_stop,
            )
        return rendered_items(folder, count=config.reg_count, caption=config.class_prompt, size=size)

    def _make_ema(self) -> AdapterEMA | None:
        """The moving average of the trained adapter parameters (named by module), when EMA is on."""
        if not self.config.ema:
            return None
        trainable = {id(p) for p in self.trainable}
        params = {
            f"{part}/{name}": param
            for part, module in self.family.lora_modules().items()
            for name, param in module.named_parameters()
            if id(param) in trainable
        }
        return AdapterEMA(params, decay=self.config.ema_decay, start_step=self.config.ema_start_step)

    def _output_weights(self):
        """The weights samples and the main LoRA file use: the trained ones, or their average."""
        if self.ema is not None and self.config.ema_weights == "ema":
            return self.ema.applied()
        return contextlib.nullcontext()

    def _fill_caches(self) -> None:
        config = self.config
        self.caches = _Caches(self.family, self.paths, device=self.device)
        self.flips = (False, True) if config.flip else (False,)
        self.cached_text = config.cache_text_embeddings and not config.train_text_encoder
        self.caption_variants = self._cached_caption_variants() if self.cached_text else None
        if self.cached_text and variants_on(shuffle=config.shuffle_caption, dropout=config.tag_dropout):
            self.cached_text = self.caption_variants is not None
            self._log_caption_encoding()
        stopping = self._stop_requested()  # a Stop during setup: the run only saves its step-0 checkpoint
        stop = self.should_stop  # the main process alone fills the caches: its own Stop ends the filling
        if self.is_main and config.cache_latents and not stopping:
            trained = self.items + self.class_items
            made = self.caches.fill_latents(trained, flips=self.flips, on_event=self.on_event, should_stop=stop)
            if not stop():  # else the filling ended early: what it wrote is kept for the next run
                self.on_event(Log(f"Latents: {made} encoded, {len(trained) * len(self.flips) - made} from cache"))
            self.caches.fill_latents(self.held_out, flips=(False,), on_event=self.on_event, should_stop=stop)
        if self.is_main and self.cached_text and not stopping:
            self.caches.fill_text(self._all_captions(), on_event=self.on_event, should_stop=stop)
        if self.is_main and self.sample_prompts and not config.train_text_encoder and not stopping:
            self.sample_text = self._encode_prompts(self.sample_prompts)
        self.processes.barrier()
        # Encoders whose outputs are cached leave the GPU; the others stay where training needs them.
        self.family.vae.to(self.device if not config.cache_latents else "cpu")
        for encoder in self.family.text_encoders():
            encoder.to(self.device if not self.cached_text else "cpu")
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _encode_prompts(self, prompts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Text embeddings of the sample prompts, computed once so the encoders need not come back for samples."""
        for encoder in self.family.text_encoders():
            encoder.to(self.device)
        with torch.no_grad():
            return {p: {k: v.cpu() for k, v in self.family.encode_text([p]).items()} for p in dict.fromkeys(prompts)}

    def _all_captions(self) -> list[str]:
        trained = self.caption_variants if self.caption_variants is not None else [i.caption for i in self.items]
        # The plain captions too: validation measures the training and held-out images on them.
        captions = [*trained, *(item.caption for item in self.items + self.held_out + self.class_items)]
        return captions + [""] if self.config.caption_dropout > 0 else captions

    def _cached_caption_variants(self) -> list[str] | None:
        """Every caption variant the run can train on, when caching them is cheaper than encoding at each
        step (see :mod:`.caption_variants`); None when the captions are encoded at each step instead."""
        config = self.config
        if not variants_on(shuffle=config.shuffle_caption, dropout=config.tag_dropout):
            return None
        return variants_to_cache(
            [item.caption for item in self.items],
            trigger=self.trigger,
            keep_tokens=config.keep_tokens,
            shuffle=config.shuffle_caption,
            dropout=config.tag_dropout,
            encodings=self.total_steps * config.gradient_accumulation * config.batch_size * self.world,
        )

    def _log_caption_encoding(self) -> None:
        if self.caption_variants is not None:
            self.on_event(Log(f"Caption shuffle/tag dropout: {len(self.caption_variants)} caption variants cached"))
        else:
            self.on_event(
                Log("Caption shuffle/tag dropout: captions are encoded at each step (text encoders stay on the device)")
            )

    def _vary_captions(self, share: Share, *, draw: int, micro: int) -> list[TrainItem]:
        """The share's items with this step's caption variants (shuffled tags, tag dropout)."""
        config = self.config
        if share.prior or not variants_on(shuffle=config.shuffle_caption, dropout=config.tag_dropout):
            return share.items  # class images keep their prompt; without variants there is nothing to draw
        return [
            dataclasses.replace(
                item,
                caption=caption_variant(
                    item.caption,
                    trigger=self.trigger,
                    keep_tokens=config.keep_tokens,
                    shuffle=config.shuffle_caption,
                    dropout=config.tag_dropout,
                    seed=config.seed,
                    step=draw,
                    index=f"{micro}/{position}/{item.sha256}",
                ),
            )
            for item, position in zip(share.items, share.positions, strict=True)
        ]

    def _resume_state(self) -> int:
        latest = ckpt.latest_checkpoint(self.current_run.checkpoints)
        state = ckpt.load_checkpoint(latest)
        for key in LORA_SHAPE:
            saved = state.config.get(key, LORA_SHAPE_BEFORE.get(key))
            if saved != getattr(self.config, key):
                raise UserError(
                    f"Cannot resume: {key} was {saved!r} in the checkpoint, now {getattr(self.config, key)!r}."
                )
        self.family.load_lora_state_dict(state.lora)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.skipped = state.skipped
        if self.ema is not None:
            self._resume_ema(state)
        if self.is_main:
            keep_metrics_up_to(self.current_run.logs, step=state.step)
        self.on_event(Log(f"Resuming run {self.current_run.run_id} from step {state.step} ({latest})"))
        return state.step

    def _resume_ema(self, state: ckpt.CheckpointState) -> None:
        if state.ema is None:
            self.on_event(Log("The checkpoint has no EMA: the average starts from its weights", level="warning"))
            self.ema.restart_from_weights()  # made before the checkpoint's weights were loaded
            return
        self.ema.load_state_dict(state.ema, updates=state.ema_updates)

    def _describe_run(self) -> str:
        config = self.config
        active = [
            f"precision {self.precision.label}",
            f"optimizer {config.optimizer}",
            f"lr {config.learning_rate:g} ({config.lr_scheduler}, warmup {config.lr_warmup_steps})",
            f"{network_label(config)} rank {config.rank} alpha {config.alpha:g} "
            f"on {self.family.resolve_targets(config.lora_targets)}",
            f"batch {config.batch_size} x accumulation {config.gradient_accumulation} x processes {self.world}",
            f"{len(self.items)} images ({len(self.held_out)} more held out for validation), "
            f"{self.stream.per_epoch} global batches per epoch, {self.total_steps} steps",
            f"checkpoint every {self.save_every} steps" if self.save_every else "checkpoint at the end only",
            f"samples every {self.sample_every} steps" if self.sample_every else "no samples",
        ]
        if config.base_quantization != "none":
            active.append(
                f"base {self.family.denoiser_attr} in {config.base_quantization} "
                f"({self.family.quantized_layers} layers, {self.family.quantized_share:.0%} of its weights)"
            )
        if config.gradient_checkpointing:
            active.append("gradient checkpointing")
        if config.cache_latents:
            active.append("cached latents (VAE off the GPU)")
        if self.cached_text:
            active.append("cached text embeddings (text encoders off the GPU)")
        if self.class_items:
            source = config.reg_images_dir or "rendered by the base model"
            active.append(
                f"regularization: {len(self.class_items)} class images ({source}) captioned {config.class_prompt!r}, "
                f"{self.stream.ratio:.0%} of the micro-batches, prior-loss weight {config.prior_loss_weight:g}"
            )
        if config.masked_loss:
            masked = sum(1 for item in self.items if item.mask_path)
            active.append(
                f"masked loss ({masked} of {len(self.items)} images have a mask; floor {config.mask_floor:g})"
            )
        if config.ema:
            active.append(
                f"EMA of the adapter (decay {config.ema_decay:g} from step {config.ema_start_step}; "
                f"{config.ema_weights} weights for samples and the main file)"
            )
        if config.train_text_encoder:
            active.append(f"text encoder LoRA (lr {config.text_encoder_lr:g})")
        active += describe_options(
            shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens, dropout=config.tag_dropout
        )
        prediction = self.family.prediction_type(config)
        if prediction != "flow":
            zero_snr = ", zero terminal SNR" if getattr(self.family, "zero_terminal_snr", False) else ""
            active.append(f"{prediction} prediction{zero_snr}")
        return "Training: " + "; ".join(active)

    def _setting_warnings(self) -> list[str]:
        config = self.config
        warnings = []
        if self.ignored_options:
            warnings.append(
                f"Not used by {display_name(self.family_name)} models, ignored: {', '.join(self.ignored_options)}."
            )
        if config.masked_loss and not any(item.mask_path for item in self.items):
            warnings.append(
                "Masked loss is on but no prepared image has a mask (an alpha channel or a <name>.mask.png "
                "beside the photo): the loss is not weighted."
            )
        if config.optimizer == "prodigy" and config.learning_rate < PRODIGY_MIN_LR:
            warnings.append(
                f"Prodigy runs with lr {config.learning_rate:g}: it adapts its own step size and its lr is a "
                "multiplier, usually 1.0; below 0.1 the LoRA will barely change."
            )
        return warnings

    # ----- one step ---------------------------------------------------------------
    def _batch_inputs(self, items: list[TrainItem], generator: SampleRandom):
        config = self.config
        flips = [config.flip and bool(draw < 0.5) for draw in generator.rand((len(items),))]
        dropped = [bool(draw < config.caption_dropout) for draw in generator.rand((len(items),))]
        captions = ["" if drop else item.caption for item, drop in zip(items, dropped, strict=True)]
        items = [dataclasses.replace(item, flipped=flip) for item, flip in zip(items, flips, strict=True)]
        if config.cache_latents:
            moments = torch.stack([self.caches.moments(item, flip) for item, flip in zip(items, flips, strict=True)])
        else:
            pixels = torch.stack([_load_pixels(item, flip=flip) for item, flip in zip(items, flips, strict=True)])
            moments = self.family.encode_image_moments(pixels)
        latents = self.family.latents_from_moments(moments.to(self.device), generator)
        weights = self._mask_weights(items, size=latents.shape[-2:])
        if self.cached_text:
            rows = [self.caches.text(caption) for caption in captions]
            text = {key: torch.stack([row[key] for row in rows]).to(self.device) for key in rows[0]}
        else:
            with torch.no_grad() if not config.train_text_encoder else contextlib.nullcontext():
                text = self.family.encode_text(captions)
        return latents, text, items, weights

    def _mask_weights(self, items: list[TrainItem], *, size) -> torch.Tensor | None:
        """Per-latent-pixel loss weights (B, 1, h, w) from the items' masks (1 for an item without one);
        None when masked loss is off or no item of the batch has a mask."""
        if not self.config.masked_loss or not any(item.mask_path for item in items):
            return None
        floor = self.config.mask_floor
        rows = [
            mask_weights(item.mask_path, size=tuple(size), flip=item.flipped, floor=floor)
            if item.mask_path
            else torch.ones((1, 1, *size))
            for item in items
        ]
        return torch.cat(rows).to(self.device)

    def _autocast(self):
        if self.precision.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.precision.autocast_dtype)

    def _micro_loss(self, share: Share, *, draw: int, micro: int) -> torch.Tensor:
        """This process's part of one micro-batch's loss: its per-sample losses, summed and weighted so that
        the processes' mean is the global batch's mean (see :class:`Share`)."""
        generator = SampleRandom.for_step(self.config.seed, step=draw, micro=micro, positions=share.positions)
        latents, text, items, weights = self._batch_inputs(
            self._vary_captions(share, draw=draw, micro=micro), generator
        )
        with self._autocast():
            losses = self.family.training_loss(
                latents=latents, text=text, items=items, generator=generator, config=self.config, loss_weights=weights
            )
        weight = share.weight * (self.config.prior_loss_weight if share.prior else 1.0)
        return losses.float().sum() * weight

    def _step(self, step: int) -> tuple[float, int, bool]:
        """One optimizer step; returns (loss, epoch, applied). A step whose loss or gradients are not
        finite is not applied: no optimizer or LR-schedule step (fp16's GradScaler lowers its scale)."""
        config = self.config
        accumulation = config.gradient_accumulation
        # Skipped steps move the data and noise on, so a retry sees another batch.
        draw = step + self.skipped
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(accumulation):
            share = self.stream.share(draw * accumulation + micro, rank=self.rank, world=self.world)
            with self.sync.micro_batch(last=micro == accumulation - 1) as run:
                loss = run(functools.partial(self._micro_loss, share, draw=draw, micro=micro))
                scaled = loss / accumulation
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach().float()
        loss_value = (self.processes.mean(total) / accumulation).item()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        applied = math.isfinite(loss_value) and bool(torch.isfinite(norm))
        if applied:
            if config.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(self.trainable, config.max_grad_norm, norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.scheduler.step()
        if self.scaler is not None:
            self.scaler.update()  # after an overflow: a lower scale for the next try
        return loss_value, share.epoch, applied

    # ----- outputs ----------------------------------------------------------------
    def _checkpoint(self, step: int) -> Path | None:
        if not self.is_main:
            return None
        state = ckpt.CheckpointState(
            step=step,
            lora=self.family.lora_state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None,
            config=config_to_dict(self.config),
            skipped=self.skipped,
            ema=self.ema.state_dict() if self.ema is not None else None,
            ema_updates=self.ema.updates if self.ema is not None else 0,
        )
        best = self.evaluation.best()
        path = ckpt.save_checkpoint(
            self.current_run.checkpoints,
            state,
            keep=self.config.keep_checkpoints,
            protect=best["step"] if best else None,
        )
        self.on_event(CheckpointSaved(path=str(path), step=step))
        return path

    def _eval_inputs(self, item: TrainItem) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """An image's latent mean (no sampling: the figure must not vary) and its caption's embeddings."""
        if self.config.cache_latents:
            moments = self.caches.moments(item, False)[None]
        else:
            moments = self.family.encode_image_moments(_load_pixels(item, flip=False)[None])
        mean, _ = moments.to(self.device).chunk(2, dim=1)
        if self.cached_text:
            text = {key: value[None].to(self.device) for key, value in self.caches.text(item.caption).items()}
        else:
            text = self.family.encode_text([item.caption])
        return mean, text

    def _validate(self, step: int, *, checkpointed: bool) -> None:
        """Validation and training-image losses at ``step`` (main process), into metrics and evaluation.json."""
        if not self.is_main or not self.held_out:
            return
        clock = time.perf_counter()
        self.family.denoiser.eval()
        with self._autocast(), self._output_weights():  # the weights the LoRA file gets: raw or their average
            figures = {
                "validation_loss": self._fixed_loss(self.held_out),
                "training_images_loss": self._fixed_loss(self.probe),
            }
        self.family.denoiser.train()
        if None in figures.values():
            return  # a Stop came: the run saves its checkpoint without this step's figures
        checkpoint = ckpt.checkpoint_dir(self.current_run.checkpoints, step).name if checkpointed else None
        self.evaluation.add({"step": step, **figures, "checkpoint": checkpoint})
        self.evaluation.write(self.current_run.evaluation)
        self._metrics({"step": step, **figures})
        self.timings["validation"] = self.timings.get("validation", 0.0) + time.perf_counter() - clock
        self.on_event(Validated(step=step, **figures))

    def _fixed_loss(self, items: list[TrainItem]) -> float | None:
        if not items:
            return None
        return fixed_noise_loss(
            self.family, items, inputs=self._eval_inputs, config=self.config, should_stop=self.should_stop
        )

    def _metrics(self, record: dict) -> None:
        if not self.is_main:
            return
        self.current_run.logs.mkdir(parents=True, exist_ok=True)
        with open(self.current_run.logs / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _samples(self, step: int) -> None:
        if not self.is_main:
            return
        from modules.lora_training.samples import render_samples

        def failed(prompt: str, exc: Exception) -> None:
            log.warning("sample %r at step %d failed", prompt, step, exc_info=exc)
            self.on_event(
                Log(
                    f"Sample {prompt!r} at step {step} could not be rendered, training goes on: "
                    f"{type(exc).__name__}: {exc}",
                    level="warning",
                )
            )

        width, height = Counter(item.bucket for item in self.items).most_common(1)[0][0]
        with self._output_weights():
            for path, prompt in render_samples(
                self.family,
                prompts=self.sample_prompts,
                text_for=self._sample_text,
                seed=self.config.sample_seed,
                size=(width, height),
                steps=self.config.sample_steps,
                folder=self.current_run.samples,
                step=step,
                device=self.device,
                on_failure=failed,
            ):
                self.on_event(SampleSaved(path=str(path), step=step, prompt=prompt))

    def _sample_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """Embeddings computed at the start, or now with the text encoders being trained."""
        if prompt in self.sample_text:
            return self.sample_text[prompt]
        with torch.no_grad():
            return self.family.encode_text([prompt])

    def _final_metadata(self, step: int, *, weights: str = "raw") -> dict[str, str]:
        return lora_metadata(
            weights=weights,
            ema_updates=self.ema.updates if self.ema is not None else 0,
            class_images=len(self.class_items),
            family=self.family,
            config=self.config,
            project=self.paths.name,
            run_id=self.current_run.run_id,
            base_model=self.entry.name,
            base_sha256=self.base_hash.result(),
            resolution=self.resolution,
            step=step,
            trigger=self.trigger,
            captions=[item.caption for item in self.items],
        )

    def _save_webui_copy(self) -> None:
        from modules.lora_training.export import default_export_path, export_lora
        from modules.lora_training.lycoris_copy import pipeline_base_weights

        copy = default_export_path(self.lora_path, "kohya")
        if not self._may_replace(copy) and lora_project(copy) != self.paths.name:
            self.on_event(
                Log(
                    f"No webui copy written: {copy} belongs to project {lora_project(copy)!r}; "
                    "allow overwriting to replace it.",
                    level="warning",
                )
            )
            return
        try:
            result = export_lora(self.lora_path, fmt="kohya", base_weight=pipeline_base_weights(self.family.pipe))
        except Exception as exc:  # noqa: BLE001 - the main LoRA is written: a failed copy must not fail the run
            if not isinstance(exc, UserError):
                log.exception("webui copy failed")
            self.on_event(Log(f"No webui copy written ({self.lora_path.name} is fine): {exc}", level="warning"))
            return
        check = result.verification
        self.on_event(
            Log(
                f"Webui copy ({COPY_LAYOUTS[self.config.network]} layout): {result.path} "
                f"(verified on {check.layers} layers, max weight difference {check.max_difference:.2g})"
            )
        )

    # ----- the loop ---------------------------------------------------------------
    def run(self) -> TrainResult:
        step = self.start_step
        if step == 0 and not self._stop_requested():  # stopped while caching: the caches may be incomplete
            self._validate(0, checkpointed=False)  # LoRA starts as a no-op: the base model's figures
        bad_steps = 0
        self.last_checkpoint = ckpt.latest_checkpoint(self.current_run.checkpoints)
        while step < self.total_steps:
            if self._stop_requested():
                self.last_checkpoint = self._checkpoint(step) or self.last_checkpoint
                self.on_event(Stopped(checkpoint_path=str(self.last_checkpoint), step=step))
                return TrainResult("stopped", step, checkpoint=self.last_checkpoint, message=f"stopped at step {step}")
            started = time.perf_counter()
            loss, epoch, applied = self._step(step)
            if step == self.start_step and applied:
                self.timings["first_step"] = time.perf_counter() - started
            self.timings["train"] = self.timings.get("train", 0.0) + time.perf_counter() - started
            if not applied:
                bad_steps += 1
                failure = self._skipped_step(step, loss=loss, in_a_row=bad_steps)
                if failure is not None:
                    return failure
                continue
            bad_steps = 0
            step += 1
            if self.ema is not None:
                self.ema.update(step)
            seconds = time.perf_counter() - started
            lr = self.scheduler.get_last_lr()[0]
            self._metrics({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "seconds": round(seconds, 4)})
            self.on_event(
                StepDone(step=step, total_steps=self.total_steps, epoch=epoch, loss=loss, lr=lr, s_per_step=seconds)
            )
            if self.save_every and step % self.save_every == 0 and step < self.total_steps:
                self._validate(step, checkpointed=True)
                self.last_checkpoint = self._checkpoint(step) or self.last_checkpoint
                if self.is_main:
                    from modules.lora_training.metrics import write_loss_plot

                    write_loss_plot(self.current_run.logs)
            if self.sample_every and step % self.sample_every == 0:
                self._samples(step)
        return self._finish(step)

    def _skipped_step(self, step: int, *, loss: float, in_a_row: int) -> TrainResult | None:
        """Report a step whose update was skipped; a ``failed`` result when too many came in a row."""
        self.skipped += 1
        cause = "loss" if not math.isfinite(loss) else "gradients"
        scale = f"; fp16 loss scale now {self.scaler.get_scale():g}" if self.scaler is not None else ""
        self.on_event(
            Log(
                f"Step {step + 1} not applied: non-finite {cause}{scale} ({self.skipped} skipped in this run)",
                level="warning",
            )
        )
        limit = MAX_BAD_STEPS_WITH_SCALER if self.scaler is not None else MAX_BAD_STEPS
        if in_a_row < limit:
            return None
        message = (
            f"The loss or gradients were not finite for {in_a_row} tries in a row (at step {step + 1}). "
            "Lower the learning rate, or use bf16/fp32 precision."
        )
        self.on_event(Failed(message))
        return TrainResult("failed", step, checkpoint=self.last_checkpoint, message=message)

    def _finish(self, step: int) -> TrainResult:
        self._validate(step, checkpointed=True)
        last_checkpoint = self._checkpoint(step) or self.last_checkpoint
        if not self.is_main:
            return TrainResult("finished", step, checkpoint=last_checkpoint)
        from modules.lora_training.metrics import write_loss_plot

        clock = time.perf_counter()
        write_loss_plot(self.current_run.logs)
        self._save_loras(step)
        mark_finished(self.current_run, step=step)
        if self.config.also_save_webui:
            self._save_webui_copy()
        self.timings["save"] = time.perf_counter() - clock
        if self.skipped:
            self.on_event(Log(f"{self.skipped} step(s) were not applied (non-finite loss or gradients)."))
        self.on_event(Log("Time spent: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())))
        self.on_event(Finished(lora_path=str(self.lora_path), steps=step))
        return TrainResult("finished", step, lora_path=self.lora_path, checkpoint=last_checkpoint)

    def _save_loras(self, step: int) -> None:
        """The main LoRA file; with EMA on, the other set of weights beside it (``<name>.ema`` or ``.raw``)."""
        main = self.config.ema_weights if self.ema is not None else "raw"
        with self._output_weights():
            self.family.save_lora(self.lora_path, metadata=self._final_metadata(step, weights=main))
        self.on_event(Log(f"Saved {self.lora_path}"))
        if self.ema is None:
            return
        other = "raw" if main == "ema" else "ema"
        beside = self.lora_path.with_name(f"{self.config.output_name}.{other}.safetensors")
        if not self._may_replace(beside):
            self.on_event(Log(f"Not written: {beside.name} exists; allow overwriting to replace it.", level="warning"))
            return
        with self.ema.applied() if other == "ema" else contextlib.nullcontext():
            self.family.save_lora(beside, metadata=self._final_metadata(step, weights=other))
        self.on_event(Log(f"Saved the {other} weights beside it: {beside}"))

    def _stop_requested(self) -> bool:
        return self.processes.any(bool(self.should_stop()))


def lora_metadata(
    *,
    family,
    config: TrainConfig,
    project: str,
    run_id: str,
    base_model: str,
    base_sha256: str,
    resolution: int,
    step: int,
    trigger: str,
    captions: list[str],
    weights: str = "raw",
    ema_updates: int = 0,
    class_images: int = 0,
) -> dict[str, str]:
    """The ``lora_studio.*`` header of a LoRA file: where it came from and how it was trained."""
    from families.training import metadata_json

    tags: Counter = Counter()
    for caption in captions:
        tags.update(split_tags(caption))
    return {
        "lora_studio.family": family.name,
        "lora_studio.project": project,
        "lora_studio.run_id": run_id,
        "lora_studio.base_model": base_model,
        "lora_studio.base_model_sha256": base_sha256,
        "lora_studio.resolution": str(resolution),
        "lora_studio.steps": str(step),
        "lora_studio.trigger_word": trigger,
        "lora_studio.rank": str(config.rank),
        "lora_studio.alpha": f"{config.alpha:g}",
        "lora_studio.network": config.network,
        "lora_studio.prediction_type": family.prediction_type(config),
        "lora_studio.zero_terminal_snr": str(getattr(family, "zero_terminal_snr", False)).lower(),
        "lora_studio.training_config": metadata_json(config_to_dict(config)),
        "lora_studio.tag_frequency": metadata_json({project: dict(tags.most_common(200))}),
        **_ema_metadata(config, weights=weights, updates=ema_updates),
        **({"lora_studio.masked_loss": f"floor {config.mask_floor:g}"} if config.masked_loss else {}),
        **_regularization_metadata(config, count=class_images),
    }


def _regularization_metadata(config: TrainConfig, *, count: int) -> dict[str, str]:
    from families.training import metadata_json

    if not count:
        return {}
    source = "a folder" if config.reg_images_dir else "rendered by the base model"  # no server path in a shared file
    return {
        "lora_studio.regularization": metadata_json(
            {
                "class_prompt": config.class_prompt,
                "images": count,
                "source": source,
                "ratio": config.reg_ratio,
                "prior_loss_weight": config.prior_loss_weight,
            }
        ),
        "ss_num_reg_images": str(count),
    }


def _ema_metadata(config: TrainConfig, *, weights: str, updates: int) -> dict[str, str]:
    """Which weights the file holds, and how they were averaged when they are the EMA's."""
    if not config.ema:
        return {}
    meta = {"lora_studio.weights": weights}
    if weights == "ema":
        meta["lora_studio.ema"] = (
            f"decay {config.ema_decay:g}, from step {config.ema_start_step}, {updates} averaging updates"
        )
    return meta


def network_label(config: TrainConfig) -> str:
    """The adapter type as the run log names it: "lora", "dora", "loha", "lokr (factor 8)"."""
    return f"{config.network} (factor {config.factor})" if config.network == "lokr" else config.network


def lora_header(path: Path) -> dict:
    """A LoRA file's metadata, or {} for a file we cannot read."""
    from model_formats.safetensors_header import read_safetensors_header

    try:
        _, metadata = read_safetensors_header(path)
    except UserError:
        return {}
    return metadata or {}


def lora_project(path: Path) -> str | None:
    """The project a LoRA file was trained by (its header), or None for a file we cannot tell."""
    return lora_header(path).get("lora_studio.project")


def _latest_checkpoint(trainer: Trainer) -> Path | None:
    run = getattr(trainer, "current_run", None)
    return ckpt.latest_checkpoint(run.checkpoints) if run is not None else None


def _write_failure_message(exc: OSError, trainer: Trainer) -> str:
    import errno

    where = exc.filename or "the project or loras folder"
    reason = exc.strerror or str(exc)
    needed = ""
    family = getattr(trainer, "family", None)
    if family is not None and family.lora_config is not None:
        # A checkpoint holds the LoRA weights plus optimizer state: about 3x the weights in fp32.
        size = sum(p.numel() for p in family.lora_parameters()) * 4 * 4
        needed = f" A checkpoint needs about {size / 2**20:.0f} MiB free."
    hint = " Free some disk space" if exc.errno == errno.ENOSPC else " Check the folder's permissions"
    return (
        f"Could not write {where}: {reason}.{needed}{hint}, then Resume: the last complete checkpoint "
        "and any existing LoRA were left untouched."
    )


def train(
    config: TrainConfig,
    *,
    projects_dir: Path,
    models_dir: Path,
    loras_dir: Path,
    on_event: EventSink = ignore_events,
    should_stop: Callable[[], bool] = lambda: False,
    resume: bool = False,
    run_id: str | None = None,
    new_run: bool = False,
    image_roots: Iterable[Path] | None = None,
) -> TrainResult:
    """Train a LoRA on a prepared project. Bad input raises UserError before any work;
    a failure during training (out of memory, a loss that stays NaN) ends in a ``Failed`` event.
    ``image_roots``: the folders a class-image folder must lie in (the app's IMAGE_ROOTS; None: any folder)."""
    trainer = Trainer(
        config,
        projects_dir=projects_dir,
        models_dir=models_dir,
        loras_dir=loras_dir,
        on_event=on_event,
        should_stop=should_stop,
        resume=resume,
        run_id=run_id,
        new_run=new_run,
        image_roots=image_roots,
    )
    try:
        trainer.setup()
        return trainer.run()
    except torch.cuda.OutOfMemoryError:
        log.exception("out of memory")
        on_event(Failed(OOM_ADVICE))
        latest = _latest_checkpoint(trainer)
        return TrainResult("failed", 0, checkpoint=latest, message=OOM_ADVICE)
    except OSError as exc:  # a write that failed: full disk, permissions, a vanished folder
        message = _write_failure_message(exc, trainer)
        log.error("training stopped by a failed write: %s", exc)
        on_event(Failed(message))
        latest = _latest_checkpoint(trainer)
        return TrainResult("failed", 0, checkpoint=latest, message=message)
    finally:
        if hasattr(trainer, "hash_pool"):
            trainer.hash_pool.shutdown(wait=False)
        trainer.processes.close()
