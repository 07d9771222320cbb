"""``python -m modules.lora_training export|inspect``: careful with existing files and folders, never a traceback."""

from __future__ import annotations

import pytest
import torch

from families.sdxl import SDXLFamily
from modules.lora_training.cli import main
from modules.lora_training.main_file import write_main_lora
from tests.conftest import write_config


@pytest.fixture
def setup(tmp_path, models_dir):
    config = write_config(tmp_path, models_dir)
    source = tmp_path / "loras" / "my_cat.safetensors"
    module = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    generator = torch.Generator().manual_seed(0)
    layers = {
        "unet": {
            f"{module}.lora_A.weight": torch.randn(2, 1280, generator=generator),
            f"{module}.lora_B.weight": torch.randn(1280, 2, generator=generator),
        }
    }
    metadata = {"lora_studio.family": "sdxl", "lora_studio.trigger_word": "ohwx"}
    keys = SDXLFamily.main_file_keys
    write_main_lora(source, layers, {"unet": {"r": 2, "lora_alpha": 1.0}}, metadata=metadata, keys=keys)
    return ["--app-config", str(config)], source


def _run(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return code, text


def test_export_refuses_to_overwrite_without_the_flag(setup, capsys, tmp_path):
    app, source = setup
    out = tmp_path / "copy.safetensors"
    command = [*app, "export", "--lora", str(source), "--format", "kohya", "--out", str(out)]
    code, text = _run(capsys, command)
    assert code == 0 and f"Wrote {out}" in text
    written = out.stat().st_mtime_ns
    code, text = _run(capsys, command)
    assert code == 2 and f"{out} already exists; pass --overwrite" in text
    assert out.stat().st_mtime_ns == written, "left as it was"
    code, text = _run(capsys, [*command, "--overwrite"])
    assert code == 0 and f"Wrote {out}" in text


def test_export_into_a_folder_takes_the_source_name(setup, capsys, tmp_path):
    app, source = setup
    folder = tmp_path / "for_comfy"
    folder.mkdir()
    code, text = _run(capsys, [*app, "export", "--lora", str(source), "--format", "kohya", "--out", str(folder)])
    assert code == 0 and (folder / "my_cat.safetensors").is_file()
    code, text = _run(capsys, [*app, "export", "--lora", str(source), "--format", "diffusers", "--out", f"{folder}/"])
    assert code == 2 and "already exists" in text


def test_missing_folders_and_files_are_explained(setup, capsys, tmp_path):
    app, source = setup
    export = [*app, "export", "--lora", str(source), "--format", "kohya", "--out"]
    code, text = _run(capsys, [*export, str(tmp_path / "nope" / "x.safetensors")])
    assert code == 2 and f"folder {tmp_path / 'nope'} does not exist; create it first" in text
    assert not (tmp_path / "nope").exists()
    code, text = _run(capsys, [*export, f"{tmp_path / 'new_folder'}/"])
    assert code == 2 and "does not exist; create it first" in text
    assert not (tmp_path / "new_folder").exists()
    code, text = _run(capsys, [*app, "export", "--lora", str(tmp_path / "gone.safetensors"), "--format", "kohya"])
    assert code == 2 and "gone.safetensors" in text


def test_default_export_and_inspect_of_the_main_file(setup, capsys):
    app, source = setup
    code, text = _run(capsys, [*app, "export", "--lora", str(source), "--format", "kohya"])
    webui = source.parent / "webui" / source.name
    assert code == 0 and webui.is_file()
    code, text = _run(capsys, [*app, "export", "--lora", str(source), "--format", "kohya"])
    assert code == 2 and "already exists" in text
    code, text = _run(capsys, [*app, "inspect", str(source)])
    assert code == 0 and "SDXL LoRA, diffusers format, 1 layers" in text and "trigger words: ohwx" in text
    code, text = _run(capsys, [*app, "inspect", str(source.parent / "missing.safetensors")])
    assert code == 2 and "missing.safetensors" in text
