"""CLIP scores: the scorer's numbers equal a direct computation with the same CLIPModel on inputs prepared by hand,
and models/clip/ is searched safely (real weights before the demo, no links leaving it, no FIFOs, no pickles)."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from model_formats.demo_models import DEMO_CLIP_NAME
from modules.lora_training.clip_scores import (
    AESTHETIC_HEAD,
    CLIP_FOLDER,
    ClipScorer,
    clip_format,
    find_clip_folder,
    prompt_adherence,
    subject_similarity,
)
from tests.image_folders import noise_image

TEXTS = ["a photo of ohwx cat", "a red chair in a garden, watercolor", "ohwx " * 100]  # the last is cut at 77 tokens


@pytest.fixture(scope="module")
def scorer(demo_paths):
    return ClipScorer.load(demo_paths.clip_folder)


@pytest.fixture(scope="module")
def images():
    # Landscape, portrait and square, so the shortest-edge resize and the centre crop both matter.
    sizes = [(64, 48), (40, 72), (32, 32), (50, 50)]
    return [noise_image(w, h, seed=index) for index, (w, h) in enumerate(sizes)]


def _pixels_by_hand(image: Image.Image, processor) -> torch.Tensor:
    """Resize the shortest edge to 32 (bicubic), centre-crop 32x32, scale to [0, 1], normalise by mean/std."""
    side = processor.crop_size["height"]
    width, height = image.size
    scale = processor.size["shortest_edge"] / min(width, height)
    size = (side, int(height * scale)) if width <= height else (int(width * scale), side)
    resized = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = (resized.shape[0] - side) // 2, (resized.shape[1] - side) // 2
    crop = resized[top : top + side, left : left + side] / 255.0
    normalised = (crop - np.array(processor.image_mean)) / np.array(processor.image_std)
    return torch.from_numpy(normalised.transpose(2, 0, 1).astype(np.float32))


def _unit(features) -> torch.Tensor:
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return features / features.norm(dim=-1, keepdim=True)


def _image_features_by_hand(scorer, images) -> torch.Tensor:
    pixels = torch.stack([_pixels_by_hand(image, scorer.processor) for image in images])
    with torch.no_grad():
        return _unit(scorer.model.get_image_features(pixel_values=pixels))


def _text_features_by_hand(scorer, texts) -> torch.Tensor:
    rows = []
    for text in texts:
        ids = scorer.tokenizer(text)["input_ids"]
        ids = ids[:76] + [ids[-1]] if len(ids) > 77 else ids  # truncation keeps the end token
        with torch.no_grad():
            rows.append(_unit(scorer.model.get_text_features(input_ids=torch.tensor([ids])))[0])
    return torch.stack(rows)


def test_embeddings_and_scores_equal_a_direct_computation(scorer, images):
    assert scorer.name == DEMO_CLIP_NAME
    image_embeddings = scorer.image_embeddings(images)
    text_embeddings = scorer.text_embeddings(TEXTS)
    assert image_embeddings.shape == (4, 32) and text_embeddings.shape == (3, 32)
    assert image_embeddings.dtype == text_embeddings.dtype == torch.float32
    assert image_embeddings.device.type == "cpu"
    torch.testing.assert_close(image_embeddings, _image_features_by_hand(scorer, images), atol=1e-5, rtol=0)
    torch.testing.assert_close(text_embeddings, _text_features_by_hand(scorer, TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(image_embeddings.norm(dim=-1), torch.ones(4))

    generated, references = image_embeddings[:2].numpy(), image_embeddings[2:].numpy()
    cosines = [float(np.dot(g, r)) for g in generated for r in references]
    assert subject_similarity(image_embeddings[:2], image_embeddings[2:]) == pytest.approx(np.mean(cosines), abs=1e-5)
    paired = [float(np.dot(i, t)) for i, t in zip(image_embeddings[:3].numpy(), text_embeddings.numpy(), strict=True)]
    assert prompt_adherence(image_embeddings[:3], text_embeddings) == pytest.approx(np.mean(paired), abs=1e-5)
    assert scorer.aesthetic(images) is None


def test_batches_give_the_same_embeddings(scorer, images, monkeypatch):
    from modules.lora_training import clip_scores

    whole = scorer.image_embeddings(images)
    monkeypatch.setattr(clip_scores, "BATCH_SIZE", 3)
    torch.testing.assert_close(scorer.image_embeddings(images), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.text_embeddings(TEXTS[:2]), scorer.text_embeddings(TEXTS)[:2], atol=1e-5, rtol=0)
    assert scorer.image_embeddings([]).shape == (0, 32)


def test_scores_refuse_what_cannot_be_paired(scorer):
    embeddings = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    with pytest.raises(UserError, match="pairs them one to one"):
        prompt_adherence(embeddings, embeddings[:2])
    with pytest.raises(UserError, match="no images or texts"):
        subject_similarity(embeddings, embeddings[:0])
    with pytest.raises(UserError, match="cannot be compared"):
        subject_similarity(embeddings, torch.zeros(2, 16))


@pytest.fixture
def clip_models(tmp_path, demo_paths):
    """A models/ folder whose clip/ holds a copy of the demo CLIP."""
    models = tmp_path / "models"
    shutil.copytree(demo_paths.clip_folder, models / CLIP_FOLDER / DEMO_CLIP_NAME)
    return models


def test_the_aesthetic_head_scores_the_normalised_embedding(clip_models, images, scorer):
    from safetensors.torch import save_file

    folder = clip_models / CLIP_FOLDER / DEMO_CLIP_NAME
    weight, bias = torch.randn(1, 32), torch.tensor([0.25])
    save_file({"weight": weight, "bias": bias}, str(folder / AESTHETIC_HEAD))
    scores = ClipScorer.load(folder).aesthetic(images)
    expected = _image_features_by_hand(scorer, images) @ weight[0] + 0.25
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)

    save_file({"weight": torch.randn(1, 768), "bias": bias}, str(folder / AESTHETIC_HEAD))
    with pytest.raises(UserError, match=r"'weight' \[1, 32\]"):
        ClipScorer.load(folder)


def test_find_prefers_real_weights_over_the_demo(clip_models):
    clip = clip_models / CLIP_FOLDER
    assert find_clip_folder(clip_models) == clip / DEMO_CLIP_NAME
    assert find_clip_folder(clip_models, DEMO_CLIP_NAME) == clip / DEMO_CLIP_NAME
    real = clip / "z-real-clip"  # sorts after the demo, still preferred
    shutil.copytree(clip / DEMO_CLIP_NAME, real)
    (real / "lora_studio_demo.json").unlink()
    (real / "open_clip_config.json").write_text("{}")  # both layouts: transformers' complete one is read
    (real / "open_clip_model.safetensors").write_bytes(b"")
    assert clip_format(real, root=clip) == "transformers"
    assert find_clip_folder(clip_models) == real
    assert ClipScorer.load(find_clip_folder(clip_models)).name == "z-real-clip"
    assert find_clip_folder(clip_models.parent / "empty") is None


def test_find_refuses_a_missing_name_or_a_path(clip_models):
    with pytest.raises(UserError, match="No CLIP model 'clip-vit-large' in .*leave the name empty"):
        find_clip_folder(clip_models, "clip-vit-large")
    with pytest.raises(UserError, match="not a path"):
        find_clip_folder(clip_models, "../clip")
    (clip_models / CLIP_FOLDER / "notes").mkdir()
    with pytest.raises(UserError, match="not a CLIP model folder"):
        find_clip_folder(clip_models, "notes")


def test_find_ignores_links_leaving_models_clip_and_fifos(clip_models, tmp_path):
    clip = clip_models / CLIP_FOLDER
    outside = tmp_path / "elsewhere"
    shutil.copytree(clip / DEMO_CLIP_NAME, outside)
    (outside / "lora_studio_demo.json").unlink()  # would be preferred, were it followed
    (clip / "a-link").symlink_to(outside, target_is_directory=True)
    os.mkfifo(clip / "b-fifo")
    fifo_config = clip / "c-fifo-config"
    shutil.copytree(clip / DEMO_CLIP_NAME, fifo_config)
    (fifo_config / "lora_studio_demo.json").unlink()
    (fifo_config / "config.json").unlink()
    os.mkfifo(fifo_config / "config.json")  # reading it would block forever
    assert find_clip_folder(clip_models) == clip / DEMO_CLIP_NAME
    with pytest.raises(UserError, match="not a folder inside"):
        find_clip_folder(clip_models, "a-link")
    with pytest.raises(UserError, match="not a CLIP model folder"):
        find_clip_folder(clip_models, "c-fifo-config")
    inner = clip / "d-inner-link"  # a link that stays inside models/clip is followed
    inner.symlink_to(fifo_config.name, target_is_directory=True)
    with pytest.raises(UserError, match="not a CLIP model folder"):
        find_clip_folder(clip_models, "d-inner-link")


def test_pickle_weights_are_refused_with_the_fix(clip_models):
    folder = clip_models / CLIP_FOLDER / "pickled"
    shutil.copytree(clip_models / CLIP_FOLDER / DEMO_CLIP_NAME, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(
        UserError, match=r"only pickle weights \(pytorch_model.bin\).*Convert them to model.safetensors"
    ):
        find_clip_folder(clip_models, "pickled")
    with pytest.raises(UserError, match="only pickle weights"):
        ClipScorer.load(folder)
    assert find_clip_folder(clip_models) == clip_models / CLIP_FOLDER / DEMO_CLIP_NAME


def _open_clip_source(monkeypatch):
    """open_clip's own model code (``model.py``), loaded without its package ``__init__`` (which needs
    torchvision): a stand-in for the one torchvision class its ``utils`` imports, removed after the test."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip_torch is not installed")
    package = types.ModuleType("open_clip_source")
    package.__path__ = [os.path.dirname(spec.origin)]
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    for name, module in {
        "open_clip_source": package,
        "torchvision": types.ModuleType("torchvision"),
        "torchvision.ops": types.ModuleType("torchvision.ops"),
        "torchvision.ops.misc": misc,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("utils", "pos_embed", "transformer", "modified_resnet", "timm_model", "hf_model", "model"):
        monkeypatch.delitem(sys.modules, f"open_clip_source.{name}", raising=False)
    model = importlib.import_module("open_clip_source.model")
    for name in [name for name in sys.modules if name.startswith("open_clip_source.")]:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # removed again after the test
    return model


OPEN_CLIP_CFG = {
    "embed_dim": 24,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def test_an_open_clip_folder_scores_as_open_clip_computes(tmp_path, monkeypatch, images):
    import json

    from safetensors.torch import save_file

    from model_formats.tokenizers import build_clip_tokenizer

    source = _open_clip_source(monkeypatch)
    torch.manual_seed(3)
    reference = source.CLIP(**OPEN_CLIP_CFG).eval()
    with torch.no_grad():  # open_clip's init leaves some weights at zero or one: make every one count
        for value in reference.parameters():
            value.copy_(torch.randn_like(value) * 0.1)
    folder = tmp_path / "models" / CLIP_FOLDER / "ViT-tiny-openclip"
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "open_clip_model.safetensors")
    )
    preprocess = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": preprocess})
    )

    assert find_clip_folder(tmp_path / "models") == folder
    assert clip_format(folder, root=folder.parent) == "open_clip"
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))  # an incomplete transformers layout
    assert clip_format(folder, root=folder.parent) == "open_clip"
    scorer = ClipScorer.load(folder)
    assert list(scorer.processor.image_mean) == [0.5, 0.4, 0.3]
    pixels = torch.stack([_pixels_by_hand(image, scorer.processor) for image in images])
    tokens = torch.tensor(build_clip_tokenizer()(TEXTS[:2], padding="max_length", max_length=77)["input_ids"])
    tokens[tokens == 49407] = 0  # open_clip pads with 0 after the end token
    tokens[torch.arange(2), torch.tensor([len(build_clip_tokenizer()(t)["input_ids"]) - 1 for t in TEXTS[:2]])] = 49407
    with torch.no_grad():
        expected_images = reference.encode_image(pixels, normalize=True)
        expected_texts = reference.encode_text(tokens, normalize=True)
    torch.testing.assert_close(scorer.image_embeddings(images), expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.text_embeddings(TEXTS[:2]), expected_texts, atol=1e-5, rtol=0)


def test_open_clip_architectures_other_than_the_original_are_refused(tmp_path):
    import json

    folder = tmp_path / "models" / CLIP_FOLDER / "siglip"
    folder.mkdir(parents=True)
    config = {**OPEN_CLIP_CFG, "text_cfg": {**OPEN_CLIP_CFG["text_cfg"], "pool_type": "last"}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    (folder / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="text tower's pool_type is 'last'; only the original CLIP architecture"):
        ClipScorer.load(folder)


def _vision(**values):
    return {**OPEN_CLIP_CFG, "vision_cfg": {**OPEN_CLIP_CFG["vision_cfg"], **values}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_vision(mlp_ratio=float("nan")), "mlp_ratio must be a number above 0 and at most 16; got nan"),
        (_vision(head_width=0), "head_width must be a whole number from 1 to 64; got 0"),
        (_vision(head_width=24), "a width of 64 does not split into equal attention heads"),
        ({**OPEN_CLIP_CFG, "text_cfg": {**OPEN_CLIP_CFG["text_cfg"], "vocab_size": 10**13}}, "vocab_size must be"),
        (_vision(layers=200), "layers must be a whole number from 1 to 128"),
        (_vision(patch_size=64), "image side must be a whole number from 1 to 32"),
        # in bounds but not what the file holds: refused from the shapes, before ~600 MB are built and initialised
        (_vision(width=1024, layers=12), "does not match"),
    ],
)
def test_open_clip_sizes_are_bounded_and_checked_against_the_weights_first(tmp_path, config, message):
    import json
    import time

    from safetensors.torch import save_file

    folder = tmp_path / "models" / CLIP_FOLDER / "odd"
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file({"logit_scale": torch.zeros(())}, str(folder / "open_clip_model.safetensors"))
    started = time.monotonic()
    with pytest.raises(UserError, match=re.escape(message)):
        ClipScorer.load(folder)
    assert time.monotonic() - started < 1.5
