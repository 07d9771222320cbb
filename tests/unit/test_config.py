import json
from pathlib import Path

import pytest

from core.config import config_from_dict, load_config
from core.errors import UserError

VALID = {
    "MODELS_DIR": "models",
    "LORAS_DIR": "loras",
    "LORA_PROJECTS_DIR": "LoRA_Projects_Internal",
    "OUTPUTS_DIR": "outputs",
    "DEFAULT_SDXL_MODEL_FOR_LORA": "a",
    "DEFAULT_FLUX_MODEL_FOR_LORA": "b",
    "DEFAULT_SD15_MODEL_FOR_LORA": "c",
    "LANGUAGE": "fr",
}


def test_paths_resolve_against_the_config_folder(tmp_path):
    config = config_from_dict(VALID, base_dir=tmp_path)
    assert (tmp_path / "models").resolve() == config.MODELS_DIR
    assert config.LANGUAGE == "fr"
    assert config.DEVICE == "auto"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(UserError, match="MODEL_DIR"):
        config_from_dict({**VALID, "MODEL_DIR": "x"}, base_dir=tmp_path)


def test_mistyped_value_is_named(tmp_path):
    with pytest.raises(UserError, match="BUILD_DEMO_MODELS must be a bool"):
        config_from_dict({**VALID, "BUILD_DEMO_MODELS": "yes"}, base_dir=tmp_path)
    with pytest.raises(UserError, match="LORAS_DIR must be a str"):
        config_from_dict({**VALID, "LORAS_DIR": 3}, base_dir=tmp_path)


def test_missing_key_and_bad_choice(tmp_path):
    partial = dict(VALID)
    del partial["LORAS_DIR"]
    with pytest.raises(UserError, match="missing key.*LORAS_DIR"):
        config_from_dict(partial, base_dir=tmp_path)
    with pytest.raises(UserError, match="LANGUAGE must be one of en, fr"):
        config_from_dict({**VALID, "LANGUAGE": "de"}, base_dir=tmp_path)


def test_load_config_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(bad)


def test_shipped_config_is_valid():
    from tests.conftest import ROOT

    config = load_config(ROOT / "config.json")
    assert config.MODELS_DIR == ROOT / "models"
    assert json.loads((ROOT / "config.json").read_text())["LANGUAGE"] == "en"


def test_auth_from_flag_or_config():
    from app import parse_auth

    assert parse_auth("") is None
    assert parse_auth("ann:s3cret:with:colons") == ("ann", "s3cret:with:colons")
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(UserError, match="user:password"):
            parse_auth(bad)
    config = config_from_dict({**VALID, "AUTH": "bob:pw"}, base_dir=Path("/tmp"))
    assert parse_auth(config.AUTH) == ("bob", "pw")
