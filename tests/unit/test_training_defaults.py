"""Defaults a real user relies on: precision per device and family, learning rate per optimizer,
LoRA targets per family, T5 length per Flux variant, SDXL crop conditioning under flips."""

from types import SimpleNamespace

import pytest
import torch

from families.flux import FluxFamily
from families.sdxl import SDXLFamily
from families.training import TrainingFamily
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.data import TrainItem
from modules.lora_training.train import choose_precision


def _config(**options) -> TrainConfig:
    return config_from_dict(TrainConfig, {"project": "p", "base_model": "m", **options})


@pytest.mark.parametrize(
    ("asked", "device", "family", "weights", "scaler"),
    [
        ("auto", "cpu", "sdxl", torch.float32, False),
        ("auto", "cpu", "flux", torch.float32, False),
        ("auto", "cuda", "sdxl", torch.float16, True),
        ("auto", "cuda", "flux", torch.bfloat16, False),
        ("fp16", "cpu", "sdxl", torch.float16, True),
        ("bf16", "cpu", "flux", torch.bfloat16, False),
        ("fp32", "cuda", "flux", torch.float32, False),
    ],
)
def test_precision_is_honoured_on_every_device(monkeypatch, asked, device, family, weights, scaler):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision = choose_precision(asked, device, family=family)
    assert precision.weight_dtype == weights
    assert precision.use_scaler == scaler
    assert precision.autocast_dtype == (None if weights == torch.float32 else weights)


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    from core.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match="bf16"):
        choose_precision("bf16", "cuda", family="sdxl")


def test_learning_rate_follows_the_optimizer_unless_given():
    assert _config().learning_rate == pytest.approx(1e-4)
    assert _config(optimizer="adamw8bit").learning_rate == pytest.approx(1e-4)
    assert _config(optimizer="prodigy").learning_rate == pytest.approx(1.0)
    assert _config(optimizer="prodigy").text_encoder_lr == pytest.approx(1.0)
    assert _config(optimizer="lion").learning_rate == pytest.approx(1e-4 / 3)
    assert _config(optimizer="lion8bit").learning_rate == pytest.approx(1e-4 / 3)
    assert _config().text_encoder_lr == pytest.approx(5e-5)
    assert _config(optimizer="prodigy", learning_rate=0.5).learning_rate == 0.5


def test_cli_and_presets_switch_the_learning_rate_with_the_optimizer(tmp_path):
    import json

    from modules.lora_training.cli import _train_options, build_parser
    from modules.lora_training.preset_files import read_preset

    args = build_parser().parse_args(["train", "--project", "p", "--base-model", "m", "--optimizer", "prodigy"])
    assert config_from_dict(TrainConfig, _train_options(args)).learning_rate == pytest.approx(1.0)
    (tmp_path / "mine.json").write_text(json.dumps({"options": {"optimizer": "prodigy"}}))
    assert read_preset("mine", user_dir=tmp_path)["options"]["learning_rate"] == pytest.approx(1.0)


def test_flux_targets_attention_feedforward_and_the_single_blocks_output_by_default():
    targets = FluxFamily.target_modules(_config().lora_targets)
    assert {"to_q", "add_q_proj", "ff.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"} <= set(targets)
    assert SDXLFamily.target_modules("auto") == SDXLFamily.attention_targets


def test_t5_length_is_256_for_schnell_and_512_for_dev():
    def family(guidance_embeds: bool) -> FluxFamily:
        instance = FluxFamily.__new__(FluxFamily)
        instance.pipe = SimpleNamespace(
            transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=guidance_embeds)),
            tokenizer_2=SimpleNamespace(model_max_length=512),
        )
        return instance

    assert family(True).max_sequence_length() == 512
    assert family(False).max_sequence_length() == 256


def test_crop_left_is_mirrored_for_flipped_images():
    item = TrainItem(
        sha256="x",
        image_path=None,
        caption="",
        bucket=(64, 64),
        original_size=(300, 200),
        crop_top_left=(0, 10),
        resized_size=(96, 64),
    )
    sdxl = SDXLFamily.__new__(SDXLFamily)
    plain, flipped = sdxl.time_ids([item, TrainItem(**{**item.__dict__, "flipped": True})])
    assert plain.tolist() == [200, 300, 0, 10, 64, 64]
    assert flipped.tolist() == [200, 300, 0, 96 - 64 - 10, 64, 64]


def test_options_a_family_does_not_use_are_named():
    flux = FluxFamily.__new__(FluxFamily)
    ignored = flux.configure(_config(min_snr_gamma=5.0, multires_noise_iterations=2, guidance_scale=2.0))
    assert ignored == ["min_snr_gamma=5.0", "multires_noise_iterations=2"]
    # The shared part only: SDXL's own configure() also rebuilds its noise schedule from a loaded pipeline.
    sdxl_ignored = TrainingFamily.configure(
        SDXLFamily.__new__(SDXLFamily), _config(timestep_sampling="shift", min_snr_gamma=5.0)
    )
    assert sdxl_ignored == ["timestep_sampling='shift'"]


def test_every_number_is_finite_and_within_a_stated_range():
    import dataclasses
    import math

    from core.errors import UserError
    from modules.lora_training.config import PrepareConfig

    for cls in (TrainConfig, PrepareConfig):
        for f in dataclasses.fields(cls):
            if "minimum" in f.metadata:
                assert f.metadata["maximum"] is not None and math.isfinite(f.metadata["maximum"]), f.name
    base = {"project": "p", "base_model": "m"}
    for field, value in [
        ("learning_rate", float("nan")),
        ("learning_rate", float("inf")),
        ("min_snr_gamma", float("inf")),
        ("max_grad_norm", float("nan")),
        ("alpha", float("-inf")),
        ("seed", 2**70),
        ("steps", 1_000_001),
        ("rank", 1025),
        ("sample_seed", -1),
        ("lr_warmup_steps", 10**9),
        ("seed", float("nan")),
    ]:
        with pytest.raises(UserError, match=field):
            config_from_dict(TrainConfig, {**base, field: value})
    with pytest.raises(UserError, match=r"seed must be between 0 and 9223372036854775807"):
        config_from_dict(TrainConfig, {**base, "seed": 2**63})


def test_status_carries_at_most_1000_loss_points_and_500_log_lines():
    from modules.lora_training.jobs import LOG_LINES, JobState, thinned

    job = JobState(job_id=1, project="p", kind="train")
    job.losses = [(step, 1.0 / step) for step in range(1, 250_001)]
    for line in range(2000):
        job.log.append(f"line {line}")
    status = job.as_dict()
    assert len(status["losses"]) <= 1000 and status["losses"][0] == (1, 1.0)
    assert status["losses"][-1] == (250_000, 1.0 / 250_000), "the newest point is always there"
    assert len(status["log"]) == LOG_LINES == 500
    assert thinned([1, 2, 3], limit=1000) == [1, 2, 3]
