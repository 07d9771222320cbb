"""The memory estimate's exact parts match the models as loaded, in every layout and quantization."""

import pytest
import torch

from core.model_files import model_entry
from families import family as family_class
from modules.lora_training.estimate.memory import estimate_memory


def _stored_bytes(model: torch.nn.Module) -> int:
    """Bytes the denoiser's parameters hold, bitsandbytes scales included."""
    total = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        scales = getattr(param, "SCB", None)
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total


@pytest.mark.parametrize(
    ("layout", "quantization"),
    [
        ("sdxl_folder", "none"),
        ("sdxl_single_file", "none"),
        ("flux_folder", "none"),
        ("flux_single_file", "none"),
        ("flux_single_file", "nf4"),
        ("sdxl_folder", "int8"),
    ],
)
def test_weights_and_lora_parts_are_exact(models_dir, demo_paths, layout, quantization):
    entry = model_entry(models_dir, getattr(demo_paths, layout).name)
    family = family_class(entry.family)(
        entry, models_dir=models_dir, device="cpu", weight_dtype=torch.float32, base_quantization=quantization
    )
    family.place_denoiser()  # quantizes, when asked
    measured_weights = _stored_bytes(family.denoiser)
    family.add_lora(rank=4, alpha=4.0, targets="attention+feedforward", train_text_encoder=False)
    estimate = estimate_memory(
        entry=entry,
        rank=4,
        targets=family.attention_targets + family.feedforward_targets,
        optimizer="adamw",
        resolution=64,
        batch_size=1,
        gradient_checkpointing=False,
        weight_bytes=4,
        quantization=quantization,
        device="cpu",
        device_bytes=None,
    )
    lora_params = sum(p.numel() for p in family.lora_parameters())
    assert estimate.parts["weights"] == measured_weights
    assert estimate.parts["LoRA + gradients"] == lora_params * 8
    assert estimate.parts["optimizer"] == lora_params * 8


def test_step_time_counts_the_work_that_training_does(models_dir, demo_paths):
    """Counted on the meta device: batch and checkpointing change the work as they change training."""
    from modules.lora_training.estimate.work import count_step_work

    entry = model_entry(models_dir, demo_paths.sdxl_folder.name)
    targets = family_class("sdxl").attention_targets

    def work(**options):
        values = {"targets": targets, "rank": 4, "batch": 1, "side": 64, "gradient_checkpointing": False}
        return count_step_work(entry, models_dir=models_dir, **{**values, **options})

    single, double = work(), work(batch=2)
    assert 1.8 < double.total_flops / single.total_flops < 2.2
    assert work(gradient_checkpointing=True).total_flops > 1.3 * single.total_flops
    assert work(side=128).total_flops > 3 * single.total_flops
    assert any(kind[0] == "attention" for kind in single.counts), "attention counted as one fused op"


def test_step_time_estimate_for_a_config(models_dir, demo_paths):
    import os

    from modules.lora_training.config import TrainConfig, config_from_dict
    from modules.lora_training.estimate import estimate_run
    from modules.lora_training.estimate.work import count_step_work

    for model in (demo_paths.sdxl_single_file.name, demo_paths.flux_single_file.name):
        config = config_from_dict(TrainConfig, {"project": "p", "base_model": model, "gradient_accumulation": 2})
        estimate = estimate_run(config, models_dir=models_dir, resolution=64).step_time
        assert estimate.micro_batches == 2
        assert estimate.seconds_per_step == pytest.approx(2 * estimate.seconds_per_micro_batch)
        # No CPU core computes 100 GFLOP/s in fp32: an estimate faster than that lost a unit or a factor.
        assert estimate.seconds_per_micro_batch > estimate.total_flops / (os.cpu_count() * 100e9)
        assert estimate.replayed_share > 0.9, "the heavy operations were timed on the device"
        assert "s/step on cpu" in estimate.describe()
        entry = model_entry(models_dir, model)
        targets = family_class(entry.family).target_modules("auto")
        work = {rank: count_step_work(
            entry, models_dir=models_dir, targets=targets, rank=rank, batch=1, side=64, gradient_checkpointing=False,
        ).total_flops for rank in (4, 32)}  # fmt: skip
        assert work[32] > work[4], "a larger rank is more work"
        assert work[4] < estimate.total_flops < work[32]  # the config's rank is 16


@pytest.mark.parametrize("layout", ["sdxl_folder", "flux_single_file", "sd15_single_file"])
def test_counted_activations_match_what_the_real_model_keeps(models_dir, demo_paths, layout):
    """The meta count of the tensors kept for backward, against the memory the same model, run for real,
    still holds after its forward pass (torch's profiler, not the estimator's own bookkeeping)."""
    from modules.lora_training.estimate import work as step_work

    entry = model_entry(models_dir, getattr(demo_paths, layout).name)
    targets = family_class(entry.family).attention_targets
    options = {"targets": targets, "rank": 4, "batch": 1, "side": 128}
    counted = step_work.count_step_work(entry, models_dir=models_dir, gradient_checkpointing=False, **options)
    checkpointed = step_work.count_step_work(entry, models_dir=models_dir, gradient_checkpointing=True, **options)

    model_class, config = step_work.denoiser_blueprint(entry, models_dir=models_dir)
    model = step_work.trainable_denoiser(model_class, config, targets=targets, rank=4, gradient_checkpointing=False)
    downscale, text_length = step_work.latent_geometry(entry, models_dir)
    inputs = step_work.denoiser_inputs(
        entry.family, config, batch=1, latent_side=128 // downscale, text_length=text_length, make=torch.randn
    )
    real = _memory_kept_by_forward(model, inputs)
    assert 0.9 < counted.activation_bytes / real < 1.15, (counted.activation_bytes, real)
    assert checkpointed.activation_bytes < 0.6 * counted.activation_bytes


def _memory_kept_by_forward(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes allocated during a forward pass and not freed by its end, less the output: what autograd keeps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        output = model(**inputs)
    output = output[0] if isinstance(output, tuple) else output.sample
    net = sum(event.self_cpu_memory_usage for event in profiler.key_averages())
    return net - output.numel() * output.element_size()


def test_estimate_command(models_dir, demo_paths, tmp_path, capsys):
    from modules.lora_training.cli import main
    from tests.conftest import write_config

    config = write_config(tmp_path, models_dir)
    flags = ["--project", "p", "--base-model", demo_paths.flux_folder.name, "--base-quantization", "nf4"]
    assert main(["--app-config", str(config), "estimate", *flags, "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "at 64², batch 1, rank 16" in out
    assert "Estimated peak memory" in out and "activations counted" in out and "s/step on cpu" in out


@pytest.mark.parametrize("layout", ["sdxl_folder", "flux_single_file"])
def test_text_encoders_and_vae_left_on_the_device_are_counted(models_dir, demo_paths, layout):
    """Uncached text embeddings keep the text encoders on the device, uncached latents the (fp32) VAE; a
    trained text encoder adds its adapter. The parts equal the models as the trainer loads them."""
    from modules.lora_training.config import TrainConfig, config_from_dict
    from modules.lora_training.estimate import estimate_run

    entry = model_entry(models_dir, getattr(demo_paths, layout).name)
    settings = {"project": "p", "base_model": entry.name, "rank": 4, "device": "cpu", "mixed_precision": "bf16"}
    cached = estimate_run(config_from_dict(TrainConfig, settings), models_dir=models_dir, resolution=64, timing=False)
    assert "text encoders" not in cached.memory.parts and "VAE" not in cached.memory.parts
    shuffled = config_from_dict(TrainConfig, {**settings, "shuffle_caption": True})
    varied = estimate_run(shuffled, models_dir=models_dir, resolution=64, timing=False)
    assert "text encoders" in varied.memory.parts, "caption variants usually keep the encoders on the device"
    assert "every caption variant can be cached" in varied.describe()
    uncached = {"cache_text_embeddings": False, "cache_latents": False, "train_text_encoder": True}
    config = config_from_dict(TrainConfig, {**settings, **uncached})
    parts = estimate_run(config, models_dir=models_dir, resolution=64, timing=False).memory.parts

    family = family_class(entry.family)(entry, models_dir=models_dir, device="cpu", weight_dtype=torch.bfloat16)
    assert parts["text encoders"] == sum(_stored_bytes(encoder) for encoder in family.text_encoders())
    assert parts["VAE"] == _stored_bytes(family.vae) and family.vae.dtype == torch.float32
    denoiser_only = sum(p.numel() for p in _adapted(family, train_text_encoder=False))
    family = family_class(entry.family)(entry, models_dir=models_dir, device="cpu", weight_dtype=torch.bfloat16)
    with_text = sum(p.numel() for p in _adapted(family, train_text_encoder=True))
    assert with_text > denoiser_only, "the text encoders got an adapter"
    assert parts["LoRA + gradients"] == with_text * 8
    assert cached.memory.parts["LoRA + gradients"] == denoiser_only * 8


def _adapted(family, *, train_text_encoder: bool):
    family.add_lora(rank=4, alpha=4.0, targets="auto", train_text_encoder=train_text_encoder)
    return family.lora_parameters()
