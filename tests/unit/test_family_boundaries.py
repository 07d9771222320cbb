"""No code outside families/ names a model family or its layer names: shared code asks the family."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("core", "modules", "model_formats", "bench", "app.py")
FAMILY_WORDS = re.compile(
    r"sdxl|flux|sd15|sd ?1\.5|stable-diffusion-v1|double_blocks|single_blocks|down_blocks|up_blocks|input_blocks|output_blocks|text_model"
    r"|lora_unet|lora_te|transformer_blocks",
    re.IGNORECASE,
)


def _python_files() -> list[Path]:
    files = []
    for name in CHECKED:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_the_checked_places_exist():
    assert all((ROOT / name).exists() for name in CHECKED)
    assert len(_python_files()) > 20


def test_no_family_name_outside_families():
    hits = []
    for path in _python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if match := FAMILY_WORDS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:100]}")
    assert not hits, f"{len(hits)} family names outside families/:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_should():
    for text in (
        "SDXL",
        "Flux",
        "sd15",
        "SD 1.5",
        "stable-diffusion-v1",
        "lora_te1_",
        "text_model.",
        "single_transformer_blocks",
        "up_blocks.0",
    ):
        assert FAMILY_WORDS.search(text), text
    assert not FAMILY_WORDS.search("unet.mid_block.attentions.0.proj_in")
