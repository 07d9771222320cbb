"""ModelManager: owns the one inference pipeline, its LoRAs and the GPU.

One lock serialises every use of the pipeline. Training takes the GPU with
``release()`` (or the ``lent_to()`` context manager): the pipeline is dropped and caches
emptied; generate requests meanwhile get a clear "busy" message instead of an
out-of-memory; ``restore()`` reloads the previous model and LoRAs.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.client_presence import always_present
from core.errors import GenerationCancelled, GpuBusyError, UserError
from core.lora_info import LoraInfo, read_lora_info
from core.model_files import ModelEntry, detect_family, list_loras, list_models, resolve_inside
from families import display_name
from families import family as family_named

log = logging.getLogger(__name__)

MAX_LORAS = 4
MAX_LORA_WEIGHT = 5.0  # beyond ±5 a LoRA only burns the image
KEPT_ADAPTERS = 4  # adapters left loaded beyond those in use: switching back to a recent LoRA is free
MAX_GUIDANCE = 50.0
MAX_PROMPT_CHARACTERS = 10_000
LOCK_WAIT_SLICE_S = 0.2  # a generation waiting for the pipeline asks this often whether its caller is still there


@dataclass(frozen=True)
class GenerateLimits:
    """Bounds of one request; ``config.json`` sets them (MAX_GENERATE_STEPS, MAX_IMAGE_SIDE)."""

    max_steps: int = 150
    max_side: int = 2048

    @classmethod
    def from_config(cls, config) -> GenerateLimits:
        return cls(max_steps=config.MAX_GENERATE_STEPS, max_side=config.MAX_IMAGE_SIDE)


@dataclass(frozen=True)
class LoraChoice:
    name: str
    weight: float = 1.0
    slot: int | None = None  # the Generate tab's slot number, for messages


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    seed: int = -1
    loras: tuple[LoraChoice, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    image: object  # PIL.Image.Image
    seed: int
    family: str
    parameters: dict = field(default_factory=dict)
    load_seconds: float = 0.0  # loading the model and its LoRAs, before the first denoising step


@dataclass(frozen=True)
class ReleaseInfo:
    model: str | None
    freed_bytes: int


@dataclass
class _LoadedAdapter:
    adapter: str
    fingerprint: tuple


def pick_device(preference: str = "auto") -> str:
    """ "auto" → "cuda" when a GPU is present, else "cpu"; asking for "cuda" without one is an error."""
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("Device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'.")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def _file_fingerprint(path: Path) -> tuple:
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _adapter_name(lora: str, fingerprint: tuple) -> str:
    digest = hashlib.sha1(f"{lora}|{fingerprint}".encode()).hexdigest()[:12]
    return f"lora_{digest}"


def _gpu_bytes_in_use() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _check_whole(label: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{label} {value!r} is not allowed: use a whole number between {low} and {high}.")


def _check_loras(loras: tuple[LoraChoice, ...]) -> None:
    if len(loras) > MAX_LORAS:
        raise UserError(f"At most {MAX_LORAS} LoRAs at once (got {len(loras)}).")
    for index, choice in enumerate(loras, start=1):
        weight = choice.weight
        finite = isinstance(weight, int | float) and not isinstance(weight, bool) and math.isfinite(weight)
        if not finite or abs(weight) > MAX_LORA_WEIGHT:
            raise UserError(
                f"LoRA {choice.slot or index} ({choice.name}) weight must be a number between "
                f"-{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g} (got {weight!r})."
            )
    # "x", "./x" and "dir/../x" name one file: their weights add up.
    check_summed_weights(loras, keys=[os.path.normpath(choice.name) for choice in loras])


def check_summed_weights(loras: tuple[LoraChoice, ...], *, keys: list[str]) -> None:
    """Refuse one LoRA file (``keys[i]`` names the file of ``loras[i]``) chosen in several slots whose
    weights add up beyond the bound: it is applied once at the sum."""
    found: dict[str, tuple[str, list[int], float]] = {}
    for index, (choice, key) in enumerate(zip(loras, keys, strict=True), start=1):
        name, slots, total = found.get(key, (choice.name, [], 0.0))
        found[key] = (name, [*slots, choice.slot or index], total + float(choice.weight))
    for name, slots, total in found.values():
        if len(slots) > 1 and abs(total) > MAX_LORA_WEIGHT:
            raise UserError(
                f"LoRA {name} is in slots {', '.join(map(str, slots))}: its weights add up to {total:g}, "
                f"beyond ±{MAX_LORA_WEIGHT:g}. Use it in one slot, or lower the weights."
            )


def validate_request(request: GenerationRequest, family: str, *, limits: GenerateLimits | None = None) -> None:
    """Refuse a request whose numbers are out of range (NaN and infinities included) before any work."""
    limits = limits or GenerateLimits()
    check_prompts(request)
    multiple = family_named(family).size_multiple
    for label, value in (("Width", request.width), ("Height", request.height)):
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not whole or value % multiple or not 64 <= value <= limits.max_side:
            raise UserError(
                f"{label} {value!r} is not valid for {display_name(family)}: use a multiple of {multiple} "
                f"between 64 and {limits.max_side}."
            )
    check_settings(request, limits=limits)


def check_prompts(request: GenerationRequest) -> None:
    """The prompt and negative prompt: text, not empty (the prompt), not too long."""
    for label, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        if not isinstance(text, str):
            raise UserError(f"The {label} must be text (got {text!r}).")
        if len(text) > MAX_PROMPT_CHARACTERS:
            raise UserError(
                f"The {label} is {len(text)} characters long; use at most {MAX_PROMPT_CHARACTERS} "
                "(the text encoders read only the first few hundred words anyway)."
            )
    if not request.prompt.strip():
        raise UserError("The prompt is empty: describe the image you want.")


def check_settings(request: GenerationRequest, *, limits: GenerateLimits) -> None:
    """Steps, seed, guidance and LoRA weights: the checks that do not depend on the model's family."""
    _check_whole("Steps", request.steps, 1, limits.max_steps)
    _check_whole("Seed", request.seed, -(2**63), 2**63 - 1)
    guidance = request.guidance
    if not isinstance(guidance, int | float) or not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise UserError(f"Guidance must be a number between 0 and {MAX_GUIDANCE:g} (got {guidance!r}).")
    _check_loras(request.loras)


def _read_info(path: Path, name: str) -> LoraInfo:
    """:func:`read_lora_info`; any error reading one odd file is that file's problem, never the list's."""
    try:
        return read_lora_info(path, name)
    except Exception as exc:
        log.warning("reading the LoRA %s failed: %r", name, exc)
        return LoraInfo(name, None, problem=f"corrupt or not a LoRA file: {name} ({type(exc).__name__})")


class ModelManager:
    def __init__(
        self, *, models_dir: Path, loras_dir: Path, device: str = "auto", limits: GenerateLimits | None = None
    ) -> None:
        self.models_dir = Path(models_dir)
        self.loras_dir = Path(loras_dir)
        self.limits = limits or GenerateLimits()
        self._device_preference = device
        self._lora_infos: dict[str, tuple[tuple, LoraInfo]] = {}
        self._lock = threading.RLock()
        self._pipe = None
        self._entry: ModelEntry | None = None
        self._adapters: OrderedDict[str, _LoadedAdapter] = OrderedDict()  # resolved path -> adapter, LRU order
        self._busy_reason: str | None = None
        self._released_model: str | None = None
        # Set by release(): the generation in flight stops at its next denoising step.
        self._hand_off = threading.Event()

    # ----- listing -------------------------------------------------------------
    def list_models(self) -> list[ModelEntry]:
        return list_models(self.models_dir)

    def list_loras(self) -> list[str]:
        return list_loras(self.loras_dir)

    def lora_info(self, name: str) -> LoraInfo:
        """Family and trigger word of one LoRA (header only, re-read when the file changes)."""
        path = resolve_inside(self.loras_dir, name)
        if os.path.lexists(path) and not path.is_file():
            raise UserError(
                f"LoRA {name!r} is not a regular file: only LoRA files are read. Remove it from the folder."
            )
        if not path.is_file():
            raise UserError(f"LoRA {name!r} not found in {self.loras_dir}; refresh the list.")
        fingerprint = _file_fingerprint(path)
        cached = self._lora_infos.get(name)
        if cached is None or cached[0] != fingerprint:
            cached = (fingerprint, _read_info(path, name))
            self._lora_infos[name] = cached
        return cached[1]

    def lora_details(self) -> list[LoraInfo]:
        """Every LoRA of :meth:`list_loras`, once each, with its family and trigger word."""
        details = []
        for name in self.list_loras():
            try:
                details.append(self.lora_info(name))
            except (UserError, OSError):
                continue  # removed since it was listed
        return details

    def check_loras_fit(self, loras: tuple[LoraChoice, ...], family: str) -> None:
        """Refuse unreadable LoRAs and LoRAs of the other family, before any model is loaded."""
        for choice in loras:
            info = self.lora_info(choice.name)
            if info.problem:
                raise UserError(f"{info.problem}. Replace or remove it from {self.loras_dir}.")
            if info.family != family:
                raise UserError(
                    f"{choice.name} is a {display_name(info.family)} LoRA; the selected model is {display_name(family)}. "
                    f"Pick a {display_name(family)} LoRA or a {display_name(info.family)} base model."
                )

    @property
    def loaded_model(self) -> str | None:
        return self._entry.name if self._entry else None

    @property
    def loaded_family(self) -> str | None:
        return self._entry.family if self._entry else None

    @property
    def busy_reason(self) -> str | None:
        return self._busy_reason

    @property
    def device(self) -> str:
        return pick_device(self._device_preference)

    # ----- loading -------------------------------------------------------------
    def _entry_for(self, name: str) -> ModelEntry:
        path = resolve_inside(self.models_dir, name)
        if not path.exists():
            raise UserError(f"Model {name!r} not found in {self.models_dir}. Put a checkpoint there and refresh.")
        return ModelEntry(name=name, path=path, family=detect_family(path), single_file=path.is_file())

    def _build_pipeline(self, entry: ModelEntry):
        from families import load_pipeline

        dtype = family_named(entry.family).inference_dtype(on_gpu=self.device == "cuda")
        return load_pipeline(entry, models_dir=self.models_dir, dtype=dtype).to(self.device)

    def load_model(self, name: str) -> ModelEntry:
        """Load ``name`` (no-op when already loaded). On failure the current model stays."""
        with self._lock:
            self._raise_if_busy()
            if self._entry and self._entry.name == name and self._pipe is not None:
                return self._entry
            entry = self._entry_for(name)
            try:
                pipe = self._build_pipeline(entry)
            except UserError:
                raise
            except Exception as exc:
                log.exception("loading %s failed", name)
                raise UserError(
                    f"Could not load model {name!r}: {type(exc).__name__}: {str(exc)[:300]}. "
                    "The file may be corrupt or incomplete; download it again."
                ) from exc
            self._drop_pipeline()
            self._pipe, self._entry = pipe, entry
            log.info("loaded %s (%s) on %s", name, entry.family, self.device)
            return entry

    def _drop_pipeline(self) -> None:
        self._pipe = None
        self._entry = None
        self._adapters.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def unload(self) -> None:
        with self._lock:
            self._drop_pipeline()

    # ----- LoRAs ---------------------------------------------------------------
    def _apply_loras(self, loras: tuple[LoraChoice, ...], *, go_on: Callable[[], None] = lambda: None) -> None:
        """Load and weight the request's LoRAs; ``go_on()`` is called before each file is loaded (it raises
        to stop there: the LoRAs loaded so far stay recorded, the next request sets the weights it wants)."""
        pipe = self._pipe
        # Keyed by the resolved file: "x", "./x" and an absolute path are one adapter, loaded once.
        files = [(choice, self._lora_path(choice.name)) for choice in loras]
        check_summed_weights(loras, keys=[str(path) for _, path in files])
        summed: dict[str, float] = {}
        for choice, path in files:
            adapter = self._adapter_for(path, choice.name, go_on=go_on)
            summed[adapter] = summed.get(adapter, 0.0) + float(choice.weight)
        # A LoRA at weight 0 is left out: peft would still apply a DoRA's magnitudes (weight scales only B·A).
        wanted = [(adapter, weight) for adapter, weight in summed.items() if weight != 0]
        if wanted:
            pipe.enable_lora()
            pipe.set_adapters([a for a, _ in wanted], adapter_weights=[w for _, w in wanted])
        elif self._adapters:
            pipe.disable_lora()
        self._evict_adapters(in_use=set(summed))

    def loaded_adapter(self, name: str) -> str | None:
        """The adapter the LoRA ``name`` is loaded as (None when it is not loaded)."""
        loaded = self._adapters.get(str(resolve_inside(self.loras_dir, name)))
        return loaded.adapter if loaded else None

    def _lora_path(self, name: str) -> Path:
        path = resolve_inside(self.loras_dir, name)
        if not path.is_file():
            raise UserError(f"LoRA {name!r} not found in {self.loras_dir}; refresh the list.")
        return path

    def _adapter_for(self, path: Path, lora: str, *, go_on: Callable[[], None]) -> str:
        """The adapter of ``path`` as it is now on disk, loaded when missing or changed; marked recently used."""
        key = str(path)
        fingerprint = _file_fingerprint(path)
        loaded = self._adapters.get(key)
        if loaded is None or loaded.fingerprint != fingerprint:
            go_on()
            if loaded is not None:
                self._pipe.delete_adapters([loaded.adapter])
                del self._adapters[key]
            adapter = _adapter_name(key, fingerprint)
            self._load_adapter(path, adapter, lora)
            self._adapters[key] = _LoadedAdapter(adapter, fingerprint)
        self._adapters.move_to_end(key)
        return self._adapters[key].adapter

    def _evict_adapters(self, *, in_use: set[str]) -> None:
        """Unload the least recently used adapters beyond :data:`KEPT_ADAPTERS` (never one in use), so memory
        does not grow with every LoRA ever chosen."""
        for key in list(self._adapters):
            if len(self._adapters) <= KEPT_ADAPTERS:
                return
            loaded = self._adapters[key]
            if loaded.adapter not in in_use:
                self._pipe.delete_adapters([loaded.adapter])
                del self._adapters[key]

    def _loaded_adapter_names(self) -> set[str]:
        return {name for names in self._pipe.get_list_adapters().values() for name in names}

    def _load_adapter(self, path: Path, adapter: str, lora: str) -> None:
        from core.adapter_files import load_lora_file

        pipe = self._pipe
        model = self._entry.name
        try:
            load_lora_file(pipe, path, adapter_name=adapter)
        except UserError:
            self._undo_failed_load(adapter)
            raise
        except Exception as exc:
            self._undo_failed_load(adapter)
            log.warning("LoRA %s failed on %s: %s", lora, model, exc)
            raise UserError(
                f"LoRA {lora!r} does not fit model {model!r} ({display_name(self._entry.family)}): "
                f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}. "
                "It was probably trained for another base model."
            ) from exc
        if adapter not in self._loaded_adapter_names():
            raise UserError(
                f"LoRA {lora!r} has no weights that match model {model!r} ({display_name(self._entry.family)}); "
                "it was made for another model family."
            )

    def _undo_failed_load(self, adapter: str) -> None:
        """A failed load must leave the model as it was: its layers are removed, and when that cannot be
        made sure of, the pipeline is dropped (the next request loads the model again, clean)."""
        from core.adapter_files import remove_adapter

        try:
            clean = remove_adapter(self._pipe, adapter)
        except Exception:
            log.exception("removing the failed LoRA %s", adapter)
            clean = False
        if not clean:
            log.warning("a failed LoRA load left layers behind: the model will be loaded again")
            self._drop_pipeline()

    # ----- generation ----------------------------------------------------------
    def _raise_if_busy(self) -> None:
        if self._busy_reason:
            raise GpuBusyError(
                f"The GPU is busy: {self._busy_reason} is in progress. Generation is available again when it ends."
            )

    def generate(
        self, request: GenerationRequest, *, client_present: Callable[[], bool] = always_present
    ) -> GenerationResult:
        """One image. ``client_present`` is asked while waiting for the pipeline, before loading the model,
        between LoRA loads and between denoising steps: once the caller has gone (or stopped the work),
        the generation stops there and frees the pipeline for the next request."""
        import torch

        self._raise_if_busy()
        with self._lock_while_present(client_present):
            self._raise_if_busy()
            # Check the request before loading anything, so a bad one never replaces the loaded model.
            family = self._entry_for(request.model).family
            validate_request(request, family, limits=self.limits)
            self.check_loras_fit(request.loras, family)
            loading = time.perf_counter()
            self._go_on_or_raise(client_present, before="loading the model")
            entry = self.load_model(request.model)
            self._apply_loras(request.loras, go_on=lambda: self._go_on_or_raise(client_present, before="its LoRAs"))
            load_seconds = time.perf_counter() - loading
            self._go_on_or_raise(client_present, before="the first step")
            seed = request.seed if request.seed >= 0 else random.randrange(2**31)
            kwargs = self._pipeline_kwargs(request, entry, generator=torch.Generator(device="cpu").manual_seed(seed))
            log.info(
                "generation started: %d steps at %dx%d on %s", request.steps, request.width, request.height, entry.name
            )
            stopped_at = []
            callback = self._stop_between_steps(stopped_at, client_present=client_present)
            with torch.inference_mode():
                image = self._pipe(**kwargs, callback_on_step_end=callback).images[0]
            if stopped_at:
                self._raise_stopped(stopped_at[0], request.steps)
        parameters = {
            "model": entry.name,
            "family": entry.family,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt if family_named(entry.family).uses_negative_prompt else "",
            "steps": request.steps,
            "guidance": request.guidance,
            "width": request.width,
            "height": request.height,
            "seed": seed,
            "loras": [{"name": c.name, "weight": c.weight} for c in request.loras],
        }
        return GenerationResult(
            image=image, seed=seed, family=entry.family, parameters=parameters, load_seconds=load_seconds
        )

    @staticmethod
    def _pipeline_kwargs(request: GenerationRequest, entry: ModelEntry, *, generator) -> dict:
        kwargs = dict(
            prompt=request.prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            generator=generator,
        )
        kwargs.update(family_named(entry.family).generate_kwargs(negative_prompt=request.negative_prompt))
        return kwargs

    @contextlib.contextmanager
    def _lock_while_present(self, client_present: Callable[[], bool]) -> Iterator[None]:
        """The pipeline's lock, waited for in short slices: a caller that has gone (or was stopped), or a
        training run asking for the GPU, ends the wait instead of queueing behind the generation in flight."""
        while not self._lock.acquire(timeout=LOCK_WAIT_SLICE_S):
            self._go_on_or_raise(client_present, before="the GPU was free")
        try:
            yield
        finally:
            self._lock.release()

    def _go_on_or_raise(self, client_present: Callable[[], bool], *, before: str) -> None:
        """Raise when the work should not go on: a training run asks for the GPU, or the caller has gone."""
        if self._hand_off.is_set() or self._busy_reason:
            raise GpuBusyError(
                f"Generation stopped before {before}: a training run needs the GPU. "
                "Generate again when it has finished."
            )
        if not client_present():
            log.info("generation cancelled before %s: the client disconnected or stopped it", before)
            raise GenerationCancelled(f"Generation cancelled before {before}: the client disconnected or stopped it.")

    def _stop_between_steps(self, stopped_at: list, *, client_present: Callable[[], bool]):
        """A diffusers step callback that interrupts the pipeline once release() asks for the GPU
        or the client has gone; records the step and the reason in ``stopped_at``."""

        def callback(pipe, step, timestep, tensors):
            if stopped_at:
                return tensors
            reason = "hand-off" if self._hand_off.is_set() else None if client_present() else "client gone"
            if reason:
                stopped_at.append((step + 1, reason))
                pipe._interrupt = True  # diffusers' own flag: the remaining steps are skipped
            return tensors

        return callback

    @staticmethod
    def _raise_stopped(stopped: tuple[int, str], steps: int) -> None:
        step, reason = stopped
        if reason == "hand-off":
            raise GpuBusyError(
                f"Generation stopped at step {step}/{steps}: a training run needs the GPU. "
                "Generate again when it has finished."
            )
        log.info("generation cancelled at step %d/%d: the client disconnected", step, steps)
        raise GenerationCancelled(f"Generation cancelled at step {step}/{steps}: the client disconnected.")

    # ----- GPU hand-off --------------------------------------------------------
    def release(self, reason: str) -> ReleaseInfo:
        """Free the GPU for another job; a generation in flight stops at its next step."""
        self._hand_off.set()
        try:
            return self._release(reason)
        finally:
            self._hand_off.clear()

    def _release(self, reason: str) -> ReleaseInfo:
        with self._lock:
            if self._busy_reason:
                raise GpuBusyError(f"The GPU is already in use: {self._busy_reason}.")
            before = _gpu_bytes_in_use()
            self._released_model = self.loaded_model
            self._drop_pipeline()
            self._busy_reason = reason
            return ReleaseInfo(model=self._released_model, freed_bytes=max(0, before - _gpu_bytes_in_use()))

    def restore(self) -> str | None:
        """Give the GPU back to inference and reload the model that was loaded before."""
        with self._lock:
            model, self._released_model = self._released_model, None
            self._busy_reason = None
            if model is None:
                return None
            try:
                self.load_model(model)
            except UserError as exc:
                log.error("could not restore %s after the GPU came back: %s", model, exc)
                return None
            return model

    @contextlib.contextmanager
    def lent_to(self, reason: str) -> Iterator[ReleaseInfo]:
        info = self.release(reason)
        try:
            yield info
        finally:
            self.restore()
