"""The family interface: what shared code may ask of any model family, without loading a model.

Class attributes and class methods answer for the family as a whole (detection, loading, file
layouts, LoRA names, estimate inputs, the demo model); :class:`families.training.TrainingFamily`
adds the training hooks that work on one loaded model. Heavy imports stay inside the methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.model_files import ModelEntry

# The prefix of the denoiser's tensors in original-layout (LDM / "webui") single files.
ORIGINAL_DENOISER_PREFIX = "model.diffusion_model."


class ModelFamily:
    name = ""
    display_name = ""  # in messages: "SDXL", "Flux"
    pipeline_marker = ""  # a diffusers folder's model_index.json class name contains it
    denoiser_attr = ""  # "unet" or "transformer": the pipeline component that gets LoRA
    text_encoder_attrs: tuple[str, ...] = ()
    size_multiple = 8  # image sides must be a multiple of this
    uses_negative_prompt = True
    auto_precision_on_gpu = "fp16"  # what mixed_precision "auto" means on a CUDA GPU
    # Activation memory per image at 1024², batch 1, half precision (with / without gradient checkpointing).
    activation_gib = (1.6, 8.0)
    quantized_blocks = "transformer_blocks"  # layers inside modules with this name may be quantized
    lora_key_markers: tuple[str, ...] = ()  # substrings of LoRA tensor names only this family has
    demo_name = ""  # the tiny random-weight demo model's file and folder name
    demo_architecture = ""  # its modelspec.architecture
    default_guidance = 5.0  # guidance scale for samples and the bench's images
    smallest_preset = ""  # the memory preset for the smallest GPU the family fits
    # The frozen base's quantization where a full-size run must fit a consumer machine.
    full_size_quantization = "none"

    # ----- detection ----------------------------------------------------------------
    @classmethod
    def matches_checkpoint(cls, keys: list[str]) -> bool:
        """Whether a base-model checkpoint with these tensor names is of this family."""
        raise NotImplementedError

    @classmethod
    def claims_lora_metadata(cls, metadata: dict[str, str]) -> bool:
        """Whether kohya/modelspec header metadata names this family."""
        raise NotImplementedError

    @classmethod
    def folder_refusal(cls, folder: Path) -> str | None:
        """Why a diffusers folder whose pipeline class this family claims is not of this family, else None."""
        return None

    # ----- loading ------------------------------------------------------------------
    @classmethod
    def load_pipeline(cls, entry: ModelEntry, *, models_dir: Path, dtype):
        """The diffusers pipeline for ``entry`` on the CPU, in ``dtype``."""
        raise NotImplementedError

    @classmethod
    def components_folder(cls, entry: ModelEntry, models_dir: Path) -> Path:
        """The diffusers folder holding the VAE, tokenizer and scheduler configs that go with ``entry``."""
        raise NotImplementedError

    @classmethod
    def inference_dtype(cls, *, on_gpu: bool):
        import torch

        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if cls.auto_precision_on_gpu == "bf16" else torch.float16

    @classmethod
    def generate_kwargs(cls, *, negative_prompt: str) -> dict:
        """Pipeline arguments of a Generate request beyond prompt, steps, guidance, size and seed."""
        return {"negative_prompt": negative_prompt or None} if cls.uses_negative_prompt else {}

    # ----- the estimate (meta device, headers only) -----------------------------------
    @classmethod
    def denoiser_shapes(cls, entry: ModelEntry) -> dict[str, tuple[int, ...]]:
        """The denoiser's tensor shapes, from the safetensors headers alone."""
        from model_formats.safetensors_header import header_shapes

        if entry.single_file:
            return cls.single_file_denoiser_shapes(entry.path)
        shapes = {}
        for file in sorted((entry.path / cls.denoiser_attr).glob("*.safetensors")):
            shapes.update(header_shapes(file))
        return shapes

    @classmethod
    def single_file_denoiser_shapes(cls, path: Path) -> dict[str, tuple[int, ...]]:
        from model_formats.safetensors_header import header_shapes

        prefix = ORIGINAL_DENOISER_PREFIX
        return {key[len(prefix) :]: shape for key, shape in header_shapes(path).items() if key.startswith(prefix)}

    @classmethod
    def denoiser_blueprint(cls, entry: ModelEntry, *, models_dir: Path) -> tuple[type, dict]:
        """The denoiser's class and its real configuration, read without loading weights."""
        raise NotImplementedError

    @classmethod
    def text_tokens(cls, folder: Path) -> int:
        """Text tokens the denoiser attends to, for the components in ``folder``."""
        raise NotImplementedError

    @classmethod
    def meta_inputs(cls, config: dict, *, batch: int, latent_side: int, text_length: int, make) -> dict:
        """Denoiser inputs shaped as the training step feeds them; ``make(*shape)`` creates each tensor."""
        raise NotImplementedError

    @classmethod
    def narrow_config(cls, config: dict) -> dict:
        """The same architecture, every block and layer kept, at the smallest widths it accepts."""
        raise NotImplementedError

    # ----- LoRA files -----------------------------------------------------------------
    @classmethod
    def main_file_keys(cls, component: str, module: str) -> tuple[str, str]:
        """(down key, up key) of ``module`` (a name inside ``component``) in the main LoRA file."""
        from families.clip_names import with_clip_level

        if component in cls.text_encoder_attrs:
            module = with_clip_level(module)
        return f"{component}.{module}.lora_A.weight", f"{component}.{module}.lora_B.weight"

    @classmethod
    def module_parts(cls, modules: list, layout: str) -> list[tuple[tuple[str, ...], str]]:
        """Per file module (:class:`~modules.lora_training.lora_layouts.FileModule`), the diffusers
        modules it changes and how ("rename", "fused", "swapped")."""
        raise NotImplementedError

    @classmethod
    def kohya_plan(cls, source) -> list:
        """The modules of the kohya/webui copy of ``source`` (a ``PartSource``), in writing order."""
        raise NotImplementedError

    @classmethod
    def lycoris_name(cls, part: str) -> str:
        """The webui module name of one diffusers module (``<component>.<module>``), never fused: the
        LyCORIS copy (LoKr, LoHa, DoRA) writes each module on its own."""
        raise NotImplementedError

    @classmethod
    def lycoris_names(cls, parts: list[str]) -> dict[str, tuple[tuple[str, ...], str]]:
        """{webui module name: (the diffusers modules it changes, "rename" / "fused" / "swapped")} for the
        LyCORIS files other tools write, over ``parts`` (``<component>.<module>``, the pipeline's own
        adaptable layers). A name two modules would share is left out: it places neither."""
        names: dict[str, list[str]] = {}
        for part in parts:
            try:
                names.setdefault(cls.lycoris_name(part), []).append(part)
            except (KeyError, IndexError, ValueError):
                continue  # a layer the webui naming has no name for
        return {name: ((found[0],), "rename") for name, found in names.items() if len(found) == 1}

    @classmethod
    def kohya_identity(cls) -> dict[str, str]:
        """``ss_base_model_version`` and ``ss_network_module`` as kohya sd-scripts writes them."""
        raise NotImplementedError

    @classmethod
    def modelspec_identity(cls) -> dict[str, str]:
        """``modelspec.architecture`` and ``modelspec.implementation`` of this family's LoRAs."""
        raise NotImplementedError

    @classmethod
    def modelspec_prediction_type(cls, metadata: dict[str, str]) -> str:
        """modelspec's name for what the base model predicts: "epsilon", "v" or "flow"."""
        raise NotImplementedError

    @classmethod
    def kohya_extra_metadata(cls, metadata: dict[str, str]) -> dict[str, str]:
        """Header fields sd-scripts writes only for this family."""
        return {}

    # ----- full size and the demo model -----------------------------------------------
    @classmethod
    def full_size_config_folder(cls, models_dir: Path) -> Path:
        """A diffusers-layout config folder (no weights) of the full-size architecture, written offline
        into ``models_dir/configs``; random-weight builds (the bench) start from it."""
        raise NotImplementedError

    @classmethod
    def build_demo_pipeline(cls, *, seed: int = 0):
        """A tiny pipeline of this family with random weights, built from real classes."""
        raise NotImplementedError

    @classmethod
    def save_single_file(cls, pipe, path: Path, *, metadata: dict[str, str]) -> None:
        """Write ``pipe`` as the single file this family's models ship as (atomically)."""
        raise NotImplementedError
