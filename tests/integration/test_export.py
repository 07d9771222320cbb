"""LoRA files that load everywhere: webui/kohya export, verification, inspect, foreign LoRAs in."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import UserError
from core.model_manager import GenerationRequest, LoraChoice, ModelManager
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.export import compare, export_lora, inspect_lora, read_lora
from modules.lora_training.train import train
from tests.conftest import ROOT
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME


@pytest.fixture(scope="module")
def trained(sdxl_project, models_dir, tmp_path_factory):
    """One LoRA per family (alpha ≠ rank), trained by us with the webui copy on."""
    projects, name = sdxl_project
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(projects, root / "projects")
    loras = root / "loras"
    out = {}
    for family, model in (("sdxl", DEMO_SDXL_NAME), ("flux", DEMO_FLUX_NAME)):
        config = config_from_dict(
            TrainConfig,
            {
                "project": name,
                "base_model": model,
                "name": f"{family}-lora",
                "steps": 12,
                "rank": 4,
                "alpha": 2.0,
                "learning_rate": 1e-2,
                "train_text_encoder": family == "sdxl",
            },
        )
        result = train(config, projects_dir=root / "projects", models_dir=models_dir, loras_dir=loras)
        out[family] = result.lora_path
    return loras, out


def _render(manager, model, loras=()):
    guidance = 5.0 if "sdxl" in model else 3.5
    request = GenerationRequest(
        model=model, prompt="ohwx, a photo", steps=3, width=64, height=64, seed=5, guidance=guidance, loras=loras
    )
    return np.asarray(manager.generate(request).image, dtype=np.float32) / 255.0


@pytest.mark.parametrize(("family", "model"), [("sdxl", DEMO_SDXL_NAME), ("flux", DEMO_FLUX_NAME)])
def test_webui_export_and_diffusers_file_give_the_same_image(trained, models_dir, family, model):
    loras, files = trained
    webui = loras / "webui" / f"{family}-lora.safetensors"
    assert webui.is_file(), "the webui copy is written at the end of training"
    with safe_open(str(webui), framework="pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
        # alpha / rank as trained (2 / 4), also for Flux modules that fuse q, k, v (rank and alpha x3 or x4)
        scales = {
            handle.get_tensor(k).item() / handle.get_slice(k.replace(".alpha", ".lora_down.weight")).get_shape()[0]
            for k in keys
            if k.endswith(".alpha")
        }
    assert scales == {0.5}
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
    if family == "flux":
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["modelspec.trigger_phrase"] == "ohwx"
    assert "ohwx" in meta["ss_tag_frequency"]
    for key in (
        "ss_base_model_version",
        "ss_network_module",
        "ss_resolution",
        "modelspec.architecture",
        "modelspec.title",
    ):
        assert meta[key], key

    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    assert f"webui/{family}-lora.safetensors" not in manager.list_loras(), "copies for other apps are not listed"
    if family == "flux":
        # Diffusers reads the BFL layout only at full width (test_export_flux_layout checks that reader);
        # the tiny model's copy is compared layer by layer.
        check = compare(read_lora(files[family]), read_lora(webui))
        assert check.ok and check.layers == len(read_lora(files[family]).parts())
        return
    base = _render(manager, model)
    ours = _render(manager, model, (LoraChoice(files[family].name, 1.0),))
    exported = _render(manager, model, (LoraChoice(f"webui/{family}-lora.safetensors", 1.0),))
    assert np.abs(ours - exported).max() < 1e-3
    assert np.abs(ours - base).max() > 1e-3


def test_diffusers_export_round_trip_and_refusals(trained, tmp_path):
    _, files = trained
    result = export_lora(files["sdxl"], fmt="diffusers", out=tmp_path / "copy.safetensors")
    assert result.verification.ok and result.verification.layers > 0
    with pytest.raises(UserError, match="overwrite its source"):
        export_lora(files["sdxl"], fmt="kohya", out=files["sdxl"])
    with pytest.raises(UserError, match="format must be one of"):
        export_lora(files["sdxl"], fmt="a1111")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt or not a LoRA file: broken.safetensors"):
        export_lora(broken, fmt="kohya")


def _hand_made_kohya_lora(path, *, rank=4, alpha=1.0, seed=0):
    """An SDXL LoRA written by hand in kohya layout, for the tiny U-Net's cross-attention keys."""
    generator = torch.Generator().manual_seed(seed)
    modules = {
        "input_blocks_4_1": "down_blocks.1.attentions.0",
        "input_blocks_5_1": "down_blocks.1.attentions.1",
        "middle_block_1": "mid_block.attentions.0",
        "output_blocks_0_1": "up_blocks.0.attentions.0",
        "output_blocks_1_1": "up_blocks.0.attentions.1",
    }
    tensors, deltas = {}, {}
    for original, diffusers_name in modules.items():
        for projection in ("to_k", "to_v"):
            name = f"lora_unet_{original}_transformer_blocks_0_attn2_{projection}"
            down = torch.randn(rank, 80, generator=generator)
            up = torch.randn(64, rank, generator=generator)
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
            deltas[f"{diffusers_name}.transformer_blocks.0.attn2.{projection}.weight"] = up @ down * (alpha / rank)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return deltas


def test_hand_made_kohya_lora_loads_at_the_strength_its_alpha_implies(models_dir, demo_paths, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    deltas = _hand_made_kohya_lora(loras / "kohya.safetensors", rank=4, alpha=1.0)
    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    with_lora = _render(manager, DEMO_SDXL_NAME, (LoraChoice("kohya.safetensors", 1.0),))

    def merged(scale):
        manual = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
        manual.load_model(DEMO_SDXL_NAME)
        unet = manual._pipe.unet
        with torch.no_grad():
            for key, delta in deltas.items():
                unet.get_parameter(key).add_(delta * scale)
        return _render(manual, DEMO_SDXL_NAME)

    same_scale = np.abs(with_lora - merged(1.0)).max()
    rank_scale = np.abs(with_lora - merged(4.0)).max()
    assert same_scale <= 2 / 255, "matches a manual merge at alpha/rank"
    assert rank_scale > 10 * max(same_scale, 1 / 255), "clearly differs from the merge at full rank scale"

    report = inspect_lora(loras / "kohya.safetensors")
    assert "SDXL LoRA, kohya format" in report and "rank 4, alpha 1: 10 layers" in report


def test_inspect_cli_reports_rank_alpha_and_missing_alpha(trained, tmp_path):
    _, files = trained
    command = [sys.executable, "-m", "modules.lora_training", "inspect"]
    done = subprocess.run([*command, str(files["sdxl"])], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "SDXL LoRA, diffusers format" in done.stdout and "rank 4, alpha 2" in done.stdout
    assert "trigger words: ohwx" in done.stdout

    no_alpha = tmp_path / "no_alpha.safetensors"
    save_file(
        {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 80),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 4),
        },
        str(no_alpha),
    )
    done = subprocess.run([*command, str(no_alpha)], cwd=ROOT, capture_output=True, text=True)
    assert "WARNING: no alpha recorded" in done.stdout

    exported = tmp_path / "cli.safetensors"
    export = [sys.executable, "-m", "modules.lora_training", "export", "--lora", str(files["flux"])]
    done = subprocess.run(
        [*export, "--format", "kohya", "--out", str(exported)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout and exported.is_file()
