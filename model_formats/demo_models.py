"""Tiny models of every family with random weights, built offline from real classes.

They exist so the app opens, generates and trains on a machine with no GPU and no model
hub, and so the tests exercise the same loading code as real checkpoints. Random
weights draw noise: that is expected. Names say so, so nobody takes them for a real
model. Each family builds its pipeline and writes its single file
(``family.build_demo_pipeline``, ``family.save_single_file``); this module names, stamps
and saves them, and builds the tiny captioner, the tiny WD14 tagger (a fixed colour rule, not a trained
model) and the tiny CLIP that scores LoRA samples. Run ``python -m model_formats.demo_models
[MODELS_DIR]`` to (re)build them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

DEMO_FLORENCE_NAME = "demo-tiny-florence2-RANDOM-WEIGHTS"
DEMO_CLIP_NAME = "demo-tiny-clip-RANDOM-WEIGHTS"
DEMO_TAGGER_NAME = "demo-tiny-wd14-tagger-NOT-TRAINED"
DEMO_IMAGE_SIZE = 64
# Bump when the builders change so stale demo folders are rebuilt.
DEMO_VERSION = "2"
_STAMP = "lora_studio_demo.json"


def tiny_vae(**family_specific):
    """A two-block AutoencoderKL (2x downsampling) with the family's latent channels and scaling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        sample_size=DEMO_IMAGE_SIZE,
        **family_specific,
    )


def tiny_clip_config(**sizes):
    """A two-layer CLIP text config over the real 49,408-token vocabulary."""
    from transformers import CLIPTextConfig

    from model_formats.tokenizers import CLIP_VOCAB_SIZE

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        **sizes,
    )


def build_tiny_florence2(*, seed: int = 2, image_size: int = 64):
    """A tiny random Florence-2 (DaViT vision tower + BART) and its real processor classes.

    With random weights the text is one repeated token; seed 2 makes it a printable one.
    """
    import torch
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    from model_formats.tokenizers import build_tiny_bart_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_bart_tokenizer()
    side = {"height": image_size, "width": image_size}
    # DaViT downsamples 32x; the processor inserts one token per patch plus one pooled token.
    image_processor = CLIPImageProcessor(
        size=side, crop_size=side, do_center_crop=False, image_seq_length=(image_size // 32) ** 2 + 1
    )
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config={"pure_text": {}}
    )
    vision = Florence2VisionConfig(
        depths=(1, 1, 1, 1),
        embed_dim=(16, 32, 32, 32),
        num_heads=(1, 2, 2, 2),
        num_groups=(1, 2, 2, 2),
        window_size=2,
        projection_dim=32,
        max_position_embeddings=8,
        max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
    )
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    return Florence2ForConditionalGeneration(config).eval(), processor


# The demo tagger's tags (tag_id, name, category) in the published selected_tags.csv layout.
TINY_TAGS = (
    ("general", 9),
    ("sensitive", 9),
    ("questionable", 9),
    ("explicit", 9),
    ("red_theme", 0),
    ("blue_sky", 0),
    ("grass_(green)", 0),
    ("bright", 0),
    ("dark", 0),
    ("^_^", 0),
    ("tiny_character_(demo)", 4),
    ("other_character", 4),
)
TINY_TAGGER_INPUT = "input_1:0"


def tiny_tagger_weights():
    """The demo tagger's linear map: features (the mean B, G, R / 255 of the image's four quadrants, in
    the order row, column, channel: 12 values) → one logit per tag of ``TINY_TAGS``: ``(weight [12, N], bias [N])``.
    Its score for an image is ``sigmoid(features @ weight + bias)``."""
    import numpy as np

    blue, green, red = (np.zeros((2, 2, 3)) for _ in range(3))
    blue[..., 0] = green[..., 1] = red[..., 2] = 0.25  # a channel's mean over the four quadrants
    top, bottom = np.zeros((2, 2, 3)), np.zeros((2, 2, 3))
    top[0], bottom[1] = 0.5, 0.5  # the mean of one half, per channel

    def channel_of(half, channel):
        out = np.zeros((2, 2, 3))
        out[..., channel] = half[..., channel]
        return out

    light = (blue + green + red) / 3
    columns = [
        (np.zeros((2, 2, 3)), 1.0),
        (np.zeros((2, 2, 3)), 0.0),
        (np.zeros((2, 2, 3)), -1.0),
        (np.zeros((2, 2, 3)), -3.0),
        (8 * red - 4 * green - 4 * blue, -1.0),
        (8 * channel_of(top, 0) - 4 * channel_of(top, 1) - 4 * channel_of(top, 2), -1.0),
        (8 * channel_of(bottom, 1) - 4 * channel_of(bottom, 0) - 4 * channel_of(bottom, 2), -1.0),
        (6 * light, -3.0),
        (-6 * light, 3.0),
        (2 * red, -1.5),
        (10 * red, -6.0),
        (10 * blue, -6.0),
    ]
    weight = np.stack([c.reshape(12) for c, _ in columns], axis=1).astype(np.float32)
    bias = np.array([b for _, b in columns], dtype=np.float32)
    return weight, bias


def build_tiny_tagger(*, image_size: int = DEMO_IMAGE_SIZE):
    """A WD14-format ONNX tagger (NHWC BGR float input, one sigmoid score per tag) computing
    ``tiny_tagger_weights``' rule, and its ``selected_tags.csv`` text: ``(onnx ModelProto, csv text)``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = tiny_tagger_weights()
    half = image_size // 2
    nodes = [
        helper.make_node("Reshape", [TINY_TAGGER_INPUT, "quadrant_shape"], ["quadrants"]),
        helper.make_node("ReduceMean", ["quadrants", "mean_axes"], ["means"], keepdims=0),
        helper.make_node("Reshape", ["means", "feature_shape"], ["features_255"]),
        helper.make_node("Div", ["features_255", "full_scale"], ["features"]),
        helper.make_node("MatMul", ["features", "weight"], ["logits_0"]),
        helper.make_node("Add", ["logits_0", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    constants = {
        "quadrant_shape": np.array([-1, 2, half, 2, half, 3], dtype=np.int64),
        "mean_axes": np.array([2, 4], dtype=np.int64),
        "feature_shape": np.array([-1, 12], dtype=np.int64),
        "full_scale": np.array(255.0, dtype=np.float32),
        "weight": weight,
        "bias": bias,
    }
    graph = helper.make_graph(
        nodes,
        "tiny_wd14_tagger",
        [helper.make_tensor_value_info(TINY_TAGGER_INPUT, TensorProto.FLOAT, ["batch", image_size, image_size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TINY_TAGS)])],
        initializer=[numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    rows = [f"{i},{name},{category},{1000 - i}" for i, (name, category) in enumerate(TINY_TAGS)]
    return model, "tag_id,name,category,count\n" + "\n".join(rows) + "\n"


def _save_tagger_folder(folder: Path) -> None:
    from core.atomic import atomic_path

    model, tags_csv = build_tiny_tagger()
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "model.onnx").write_bytes(model.SerializeToString())
        (tmp / "selected_tags.csv").write_text(tags_csv, encoding="utf-8")
        (tmp / _STAMP).write_text(json.dumps({"version": DEMO_VERSION, "not_trained": True}))


def build_tiny_clip(*, seed: int = 0):
    """A tiny random CLIP (text and vision towers), the real CLIP tokenizer and a 32-px image processor.

    Returns ``(CLIPModel, CLIPTokenizer, CLIPImageProcessor)``; the processor is the PIL/numpy one.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from model_formats.tokenizers import build_clip_tokenizer

    torch.manual_seed(seed)
    text = tiny_clip_config(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    side = 32
    processor = clip_image_processor_class()(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, resample=3
    )
    return CLIPModel(config).eval(), build_clip_tokenizer(), processor


def clip_image_processor_class():
    """CLIP's PIL/numpy image processor (torchvision is not installed, so never the "fast" one)."""
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers before the PIL backend split: this class is the numpy one
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil


@dataclass(frozen=True)
class DemoModelPaths:
    folders: dict[str, Path]  # family name → the diffusers folder
    single_files: dict[str, Path]  # family name → the single file, in the family's original layout
    florence_folder: Path
    clip_folder: Path
    tagger_folder: Path

    def all(self) -> list[Path]:
        pairs = [(self.folders[name], self.single_files[name]) for name in self.folders]
        return [path for pair in pairs for path in pair] + [self.florence_folder, self.clip_folder, self.tagger_folder]


def demo_model_paths(models_dir: Path) -> DemoModelPaths:
    from families import all_families

    models_dir = Path(models_dir)
    return DemoModelPaths(
        folders={f.name: models_dir / f.demo_name for f in all_families()},
        single_files={f.name: models_dir / f"{f.demo_name}.safetensors" for f in all_families()},
        florence_folder=models_dir / "captioners" / DEMO_FLORENCE_NAME,
        clip_folder=models_dir / "clip" / DEMO_CLIP_NAME,
        tagger_folder=models_dir / "captioners" / DEMO_TAGGER_NAME,
    )


def _is_current(folder: Path) -> bool:
    stamp = folder / _STAMP
    try:
        return json.loads(stamp.read_text())["version"] == DEMO_VERSION
    except (OSError, ValueError, KeyError):
        return False


def _save_pipeline_folder(folder: Path, *parts) -> None:
    """Save a pipeline (or a model and its processor) into one stamped folder, atomically."""
    from core.atomic import atomic_path

    with atomic_path(folder) as tmp:
        for part in parts:
            part.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps({"version": DEMO_VERSION, "random_weights": True}))


def ensure_demo_models(models_dir: Path, *, force: bool = False) -> DemoModelPaths:
    """Build the demo models into ``models_dir`` unless current ones are already there."""
    from families import all_families

    paths = demo_model_paths(models_dir)
    for family in all_families():
        folder, single_file = paths.folders[family.name], paths.single_files[family.name]
        if force or not _is_current(folder) or not single_file.is_file():
            pipe = family.build_demo_pipeline(seed=0)
            _save_pipeline_folder(folder, pipe)
            family.save_single_file(pipe, single_file, metadata=_single_file_metadata(family))
    if force or not _is_current(paths.florence_folder):
        _save_pipeline_folder(paths.florence_folder, *build_tiny_florence2())
    if force or not _is_current(paths.clip_folder):
        _save_pipeline_folder(paths.clip_folder, *build_tiny_clip())
    if force or not _is_current(paths.tagger_folder):
        _save_tagger_folder(paths.tagger_folder)
    return paths


def _single_file_metadata(family) -> dict[str, str]:
    from model_formats.single_file import COMPANION_KEY

    return {
        "modelspec.architecture": family.demo_architecture,
        "modelspec.title": family.demo_name,
        COMPANION_KEY: family.demo_name,
        "lora_studio.random_weights": "true",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", nargs="?", default="models")
    parser.add_argument("--force", action="store_true", help="rebuild even when current")
    args = parser.parse_args(argv)
    paths = ensure_demo_models(Path(args.models_dir), force=args.force)
    for path in paths.all():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
