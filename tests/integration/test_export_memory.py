"""The webui export of a full-size LoRA (written as the trainer writes it) in bounded memory.

The export streams layer by layer; the previous one held every layer's fp32 weight change
for both files at once (~18 GiB for a full-size SDXL LoRA). Each export runs in a fresh
process that reports its peak resident memory above what it held just before.
"""

import json
import subprocess
import sys

from tests.conftest import ROOT
from tests.lora_files import (
    FLUX_ATTENTION,
    FLUX_FEEDFORWARD,
    SDXL_ATTENTION,
    SDXL_FEEDFORWARD,
    full_size_flux_linears,
    full_size_sdxl_linears,
    random_lora_layers,
    write_app_lora,
)

GIB = 2**30
RANK = 32

# Runs in the child: everything the export imports is loaded first, so the figure counts data, not code.
_MEASURE = r"""
import json, sys
from pathlib import Path
import torch
from diffusers import StableDiffusionXLPipeline  # noqa: F401  (the SDXL read-back uses its converter)
from modules.lora_training.export import export_lora

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size
except OSError:
    pass
before = status("VmRSS")
result = export_lora(Path(sys.argv[1]), fmt="kohya")
check = result.verification
print(json.dumps({"extra": status("VmHWM") - before, "before": before, "layers": check.layers,
                  "relative": check.relative, "ok": check.ok}))
"""


def _export_peak(path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{path.name}: peak extra RSS {report['extra'] / GIB:.3f} GiB over {report['before'] / GIB:.3f} GiB")
    return report


def _lora(tmp_path, family, shapes):
    layers = random_lora_layers(shapes, rank=RANK)
    path = write_app_lora(tmp_path / f"{family}-full.safetensors", layers, family=family, rank=RANK, alpha=16.0)
    del layers
    return path


def test_full_size_sdxl_export_stays_under_one_gib(tmp_path):
    shapes = full_size_sdxl_linears(SDXL_ATTENTION + SDXL_FEEDFORWARD, text_encoders=True)
    assert len([s for s in shapes if s.startswith("text_encoder_2.")]) == 32 * 4
    report = _export_peak(_lora(tmp_path, "sdxl", shapes))
    assert report["ok"] and report["layers"] == len(shapes)
    assert report["extra"] <= GIB


def test_full_size_flux_export_stays_under_one_gib(tmp_path):
    shapes = full_size_flux_linears(FLUX_ATTENTION + FLUX_FEEDFORWARD + ("single.proj_out",))
    assert "transformer.proj_out" not in shapes and "transformer.single_transformer_blocks.37.proj_out" in shapes
    report = _export_peak(_lora(tmp_path, "flux", shapes))
    assert report["ok"] and report["layers"] == len(shapes)
    assert report["extra"] <= GIB
