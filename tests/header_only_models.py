"""Full-size base models whose safetensors files hold their headers only: the real configs (the
family's ``full_size_config_folder``) and a denoiser file whose header names every tensor of the
full-size architecture, its data left as a hole (a sparse file: no disk blocks, nothing to build).

What reads headers alone (the memory estimate, the model list) sees a full-size model; loading its
weights would read zeros, so nothing here is ever loaded."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

HALF = {"dtype": "BF16", "itemsize": 2}


def write_header_only_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], *, dtype=HALF) -> None:
    """A safetensors file naming ``shapes``, its data a hole of the right length."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        count = 1
        for size in shape:
            count *= size
        end = offset + count * dtype["itemsize"]
        header[key] = {"dtype": dtype["dtype"], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(blob)))
        file.write(blob)
        file.truncate(8 + len(blob) + offset)


def header_only_full_size(family_name: str, models_dir: Path) -> str:
    """A full-size ``family_name`` folder in ``models_dir`` (header-only denoiser); its model name."""
    import torch

    from families import family

    kind = family(family_name)
    name = f"full-size-{family_name}-HEADERS-ONLY"
    folder = Path(models_dir) / name
    if folder.is_dir():
        return name
    shutil.copytree(kind.full_size_config_folder(Path(models_dir).parent / "configs"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    library, class_name = index[kind.denoiser_attr]
    model_class = getattr(__import__(library), class_name)
    config = json.loads((folder / kind.denoiser_attr / "config.json").read_text())
    with torch.device("meta"):
        model = model_class.from_config(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    write_header_only_safetensors(folder / kind.denoiser_attr / "diffusion_pytorch_model.safetensors", shapes)
    return name
