"""The GPU bench's code path, run on the CPU with the tiny model (VRAM figures exist only on CUDA)."""

from safetensors import safe_open

from bench.full_size import build_random_sdxl, measure_training
from bench.run import ReferenceStep


def test_random_model_from_a_config_folder_trains_with_a_preset(demo_paths, tmp_path):
    models = tmp_path / "models"
    folder = build_random_sdxl(
        demo_paths.sdxl_folder, models / "random-sdxl", device="cpu", dtype=__import__("torch").float32
    )
    assert (folder / "model_index.json").is_file()
    weights = "unet/diffusion_pytorch_model.safetensors"
    with (
        safe_open(str(folder / weights), framework="pt") as built,
        safe_open(str(demo_paths.sdxl_folder / weights), framework="pt") as demo,
    ):
        assert set(built.keys()) == set(demo.keys()), "same architecture as its config folder"

    result = measure_training(
        models,
        folder.name,
        work_dir=tmp_path / "run",
        preset="sdxl-8gb",
        resolution=64,
        device="cpu",
        steps=4,
        make_reference=lambda: ReferenceStep(folder, rank=16, device="cpu", resolution=64),
    )
    assert result["precision"] == "fp32"
    assert result["predicted_s_per_step"] > 0 and result["measured_s_per_step"] > 0
    assert result["predicted_parts_gib"]["weights"] > 0
    assert result["step_overhead"]["ratio"] > 0
