"""Typed, frozen configs for preparation and training.

Each field may carry ``choices`` or ``minimum``/``maximum`` in its metadata;
``from_dict`` rejects unknown keys and bad values with a message naming them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from families import FAMILY_NAMES
from modules.lora_training.dataset.captioners import CAPTIONERS, FLORENCE_TASKS
from modules.lora_training.dataset.captions import EXISTING_CAPTION_MODES


def choice(default, choices: tuple, help: str = ""):
    return field(default=default, metadata={"choices": choices, "help": help})


MAX_STEPS = 1_000_000
MAX_TAG_TEXT = 4000
MAX_SEED = 2**63 - 1


def bounded(default, *, minimum, maximum, help: str = ""):
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum, "help": help})


_KIND_NAMES = {
    Path: "a path (text)",
    str: "text",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
}


def _check_type(name: str, value, annotation):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is Path:
        if isinstance(value, str | Path):
            return Path(value)
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{name} must be a finite number; got {value!r}")
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif typing.get_origin(annotation) is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif isinstance(value, annotation):
        return value
    raise UserError(f"{name} must be {_KIND_NAMES.get(annotation, 'a list of texts')}; got {value!r}")


def _show(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def config_from_dict(cls, raw: dict):
    """Build ``cls`` from a plain dict (JSON, CLI flags), validating every value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(fields))}")
    values = {}
    for name, value in raw.items():
        f = fields[name]
        value = _check_type(name, value, hints[name])
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        minimum, maximum = f.metadata.get("minimum"), f.metadata.get("maximum")
        if value is not None and minimum is not None and not minimum <= value <= maximum:
            raise UserError(f"{name} must be between {_show(minimum)} and {_show(maximum)}; got {value!r}")
        values[name] = value
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing option(s): {', '.join(missing)}")
    return cls(**values)


def config_to_dict(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class PrepareConfig:
    project: str
    images_dir: Path
    trigger: str
    family: str = choice(FAMILY_NAMES[0], FAMILY_NAMES, "base model family the set is prepared for")
    resolution: int = bounded(1024, minimum=64, maximum=4096, help="bucket area is about resolution²")
    min_side: int | None = bounded(
        None, minimum=8, maximum=4096, help="shortest side an image needs (default: resolution/2)"
    )
    captioner: str = choice(
        "florence2",
        CAPTIONERS,
        "caption model: Florence-2 sentences, WD14 tags, both (sentence then tags), or 'none' for .txt + trigger only",
    )
    caption_task: str = choice("<DETAILED_CAPTION>", FLORENCE_TASKS, "Florence-2 task")
    caption_model: str | None = field(default=None, metadata={"help": "Florence-2 folder or hub id"})
    tagger_model: str | None = field(
        default=None, metadata={"help": "WD14 tagger folder (a path or a folder name in models/captioners/)"}
    )
    tag_threshold: float = bounded(0.35, minimum=0.0, maximum=1.0, help="tagger: general tags scoring above this")
    character_threshold: float = bounded(
        0.85, minimum=0.0, maximum=1.0, help="tagger: character tags scoring above this"
    )
    max_tags: int = bounded(0, minimum=0, maximum=1000, help="tagger: keep the N highest-scoring tags (0 = all)")
    rating_tag: bool = field(default=False, metadata={"help": "tagger: add the rating tag (general, sensitive...)"})
    tag_spaces: bool = field(default=True, metadata={"help": "tagger: underscores in tags become spaces"})
    escape_brackets: bool = field(default=True, metadata={"help": "tagger: write ( ) as \\( \\) in tags"})
    exclude_tags: str = field(default="", metadata={"help": "tagger: comma-separated tags never written"})
    include_tags: str = field(default="", metadata={"help": "tagger: comma-separated tags always written"})
    existing_captions: str = choice("keep", EXISTING_CAPTION_MODES, "what to do with .txt beside the sources")
    recaption: bool = field(default=False, metadata={"help": "caption again, overwriting edited captions"})
    duplicate_threshold: int = bounded(4, minimum=0, maximum=32, help="perceptual-hash bits for near-duplicates")
    include_subfolders: bool = field(default=False, metadata={"help": "also read the photos in subfolders"})

    def __post_init__(self):
        from modules.lora_training.dataset.scan import require_folder_text

        require_folder_text(self.images_dir)
        for name in ("exclude_tags", "include_tags", "tagger_model"):
            if len(getattr(self, name) or "") > MAX_TAG_TEXT:
                raise UserError(f"{name} is longer than {MAX_TAG_TEXT} characters")
        if self.resolution % 64:
            raise UserError(f"resolution must be a multiple of 64; got {self.resolution}")

    @property
    def minimum_side(self) -> int:
        return self.min_side if self.min_side is not None else self.resolution // 2


OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "paged_adamw8bit", "lion", "prodigy")
LR_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
LORA_TARGETS = ("auto", "attention", "attention+feedforward")
NETWORKS = ("lora", "dora", "lokr", "loha")
TIMESTEP_SAMPLING = ("sigmoid", "uniform", "shift")
QUANTIZATIONS = ("none", "int8", "nf4")
ADAMW_LR = 1e-4
# Prodigy estimates the step size itself: its lr is a multiplier, ~1.0. Lion's sign updates are
# larger than AdamW's for the same lr: 3-10x lower is usual.
DEFAULT_LEARNING_RATES = {"prodigy": 1.0, "lion": ADAMW_LR / 3, "lion8bit": ADAMW_LR / 3}


def default_learning_rate(optimizer: str) -> float:
    return DEFAULT_LEARNING_RATES.get(optimizer, ADAMW_LR)


def default_text_encoder_lr(optimizer: str, learning_rate: float) -> float:
    """Half the denoiser's rate; the same for Prodigy, whose lr is a multiplier of its own estimate."""
    return learning_rate if optimizer == "prodigy" else learning_rate / 2


@dataclass(frozen=True)
class TrainConfig:
    project: str
    base_model: str = field(metadata={"help": "a model in models/ or a path"})
    name: str | None = field(default=None, metadata={"help": "output LoRA name (default: the project name)"})
    family: str = choice("auto", ("auto", *FAMILY_NAMES), "model family (auto: detected from the base model)")
    # schedule
    epochs: int = bounded(10, minimum=1, maximum=100_000, help="passes over the set (ignored when steps is set)")
    steps: int | None = bounded(None, minimum=1, maximum=MAX_STEPS, help="optimizer steps (overrides epochs)")
    batch_size: int = bounded(1, minimum=1, maximum=256)
    gradient_accumulation: int = bounded(1, minimum=1, maximum=1024)
    repeats: int = bounded(1, minimum=1, maximum=1000, help="times each image is seen per epoch")
    # LoRA
    rank: int = bounded(16, minimum=1, maximum=1024)
    alpha: float = bounded(16.0, minimum=0.0, maximum=4096.0)
    lora_targets: str = choice(
        "auto",
        LORA_TARGETS,
        "which layers get LoRA (auto: the family's usual ones, attention and for some feed-forward)",
    )
    network: str = choice(
        "lora",
        NETWORKS,
        "adapter type: plain LoRA; DoRA (weight-decomposed: a learned magnitude per output row); "
        "LoKr (Kronecker product) or LoHa (Hadamard product), as LyCORIS names them",
    )
    factor: int = bounded(
        -1,
        minimum=-1,
        maximum=1024,
        help="LoKr: the Kronecker factor (LyCORIS' factor; -1 = the most balanced split of each layer)",
    )
    train_text_encoder: bool = False
    # optimisation
    learning_rate: float | None = bounded(
        None,
        minimum=0.0,
        maximum=10.0,
        help="default: the optimizer's usual rate (AdamW 1e-4, Lion 3.3e-5, Prodigy 1.0)",
    )
    text_encoder_lr: float | None = bounded(
        None, minimum=0.0, maximum=10.0, help="default: half the denoiser's rate (Prodigy: the same)"
    )
    optimizer: str = choice("adamw", OPTIMIZERS)
    weight_decay: float = bounded(1e-2, minimum=0.0, maximum=1.0)
    lr_scheduler: str = choice("constant", LR_SCHEDULERS)
    lr_warmup_steps: int = bounded(0, minimum=0, maximum=MAX_STEPS)
    lr_num_cycles: int = bounded(1, minimum=1, maximum=1000, help="restarts for cosine_with_restarts")
    lr_power: float = bounded(1.0, minimum=0.0, maximum=10.0, help="power for polynomial")
    max_grad_norm: float = bounded(1.0, minimum=0.0, maximum=1e4, help="gradient clipping (0 = off)")
    mixed_precision: str = choice(
        "auto", PRECISIONS, "auto: fp32 on the CPU; on a CUDA GPU the family's usual half precision (fp16 or bf16)"
    )
    gradient_checkpointing: bool = False
    base_quantization: str = choice(
        "none", QUANTIZATIONS, "frozen base transformer/U-Net blocks in 8-bit or NF4 (bitsandbytes) to save VRAM"
    )
    # noise
    prediction_type: str = choice(
        "auto", ("auto", "epsilon", "v_prediction"), "noise-prediction target (auto: the model's)"
    )
    zero_terminal_snr: bool = field(
        default=False,
        metadata={"help": "noise prediction: rescale the schedule to zero terminal SNR (for v-prediction)"},
    )
    min_snr_gamma: float = bounded(
        0.0, minimum=0.0, maximum=100.0, help="min-SNR-γ loss weighting (0 = off, 5 is typical)"
    )
    noise_offset: float = bounded(0.0, minimum=0.0, maximum=1.0)
    multires_noise_iterations: int = bounded(0, minimum=0, maximum=10, help="0 = off")
    multires_noise_discount: float = bounded(0.3, minimum=0.0, maximum=1.0)
    timestep_sampling: str = choice("sigmoid", TIMESTEP_SAMPLING, "flow-matching timestep sampling")
    guidance_scale: float = bounded(
        1.0, minimum=0.0, maximum=100.0, help="guidance embedding value (models that have one)"
    )
    # data
    caption_dropout: float = bounded(0.0, minimum=0.0, maximum=1.0)
    shuffle_caption: bool = field(
        default=False,
        metadata={
            "help": "shuffle each caption's comma-separated tags at every step (cached text embeddings are then "
            "encoded per step, unless each caption has only a few variants)"
        },
    )
    keep_tokens: int = bounded(
        1,
        minimum=0,
        maximum=64,
        help="the first N comma-separated tags never move or drop out (the trigger word always stays in place)",
    )
    tag_dropout: float = bounded(
        0.0, minimum=0.0, maximum=1.0, help="drop each tag past the kept ones with this probability at every step"
    )
    flip: bool = False
    masked_loss: bool = field(
        default=False,
        metadata={
            "help": "weight the loss by the images' masks (alpha channel or <name>.mask.png), where they have one"
        },
    )
    mask_floor: float = bounded(
        0.1, minimum=0.0, maximum=1.0, help="masked loss: the weight of the masked-out part (0 = not learned at all)"
    )
    shuffle: bool = True
    seed: int = bounded(42, minimum=0, maximum=MAX_SEED)
    cache_latents: bool = True
    cache_text_embeddings: bool = True
    validation_share: float = bounded(
        0.1,
        minimum=0.0,
        maximum=0.5,
        help="share of the prepared images held out to measure the LoRA on (none below 5 images; 0 = off)",
    )
    # regularization (prior preservation)
    reg_ratio: float = bounded(
        0.0, minimum=0.0, maximum=0.9, help="share of the micro-batches taken from the class images (0 = off)"
    )
    class_prompt: str = field(
        default="", metadata={"help": "the class images' caption, e.g. 'a photo of a dog' (needed with reg_ratio)"}
    )
    reg_images_dir: str = field(
        default="",
        metadata={"help": "a folder of class images; empty: the base model renders reg_count of them (cached)"},
    )
    reg_count: int = bounded(100, minimum=1, maximum=10_000, help="class images to render when no folder is given")
    prior_loss_weight: float = bounded(1.0, minimum=0.0, maximum=100.0, help="weight of the class images' loss")
    # EMA of the adapter weights
    ema: bool = field(
        default=False, metadata={"help": "keep an exponential moving average of the adapter weights (fp32)"}
    )
    ema_decay: float = bounded(
        0.999, minimum=0.0, maximum=1.0, help="share of the average kept at each step, strictly between 0 and 1"
    )
    ema_start_step: int = bounded(
        0, minimum=0, maximum=MAX_STEPS, help="the average follows the weights until this step, then averages"
    )
    ema_weights: str = choice(
        "raw",
        ("raw", "ema"),
        "weights of the samples and the main LoRA file (the other set goes beside it, <name>.ema/.raw)",
    )
    # outputs
    save_every_steps: int | None = bounded(
        0,
        minimum=0,
        maximum=MAX_STEPS,
        help="resumable checkpoint every N steps (0 = only at the end; null = every 10%% of the run)",
    )
    keep_checkpoints: int = bounded(3, minimum=1, maximum=1000)
    sample_every_steps: int | None = bounded(
        0, minimum=0, maximum=MAX_STEPS, help="0 = no samples; null = every 10%% of the run"
    )
    sample_prompts: tuple[str, ...] = field(default=("{trigger}",), metadata={"help": "{trigger} is replaced"})
    sample_steps: int = bounded(20, minimum=1, maximum=200)
    sample_seed: int = bounded(1234, minimum=0, maximum=MAX_SEED)
    overwrite: bool = field(default=False, metadata={"help": "replace an existing LoRA of the same name"})
    also_save_webui: bool = field(
        default=True, metadata={"help": "also write loras/webui/<name>.safetensors for A1111/Forge/ComfyUI"}
    )
    device: str = choice("auto", ("auto", "cpu", "cuda"))

    def __post_init__(self):
        if self.factor == 0:
            raise UserError("factor must be -1 (automatic) or a whole number of 1 or more; got 0")
        # An unset learning rate means the optimizer's usual one; the config then always holds numbers.
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", default_learning_rate(self.optimizer))
        if self.text_encoder_lr is None:
            object.__setattr__(self, "text_encoder_lr", default_text_encoder_lr(self.optimizer, self.learning_rate))
        if self.reg_ratio > 0 and not self.class_prompt.strip():
            raise UserError(
                "reg_ratio is set but class_prompt is empty: give the class images' caption, "
                "e.g. 'a photo of a dog', or set reg_ratio to 0."
            )
        for name in ("class_prompt", "reg_images_dir"):
            if len(getattr(self, name)) > MAX_TAG_TEXT:
                raise UserError(f"{name} is longer than {MAX_TAG_TEXT} characters")
        if not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be greater than 0 and less than 1; got {self.ema_decay!r}")

    @property
    def output_name(self) -> str:
        from modules.lora_training.names import validate_name

        return validate_name(self.name or self.project, what="LoRA name")
