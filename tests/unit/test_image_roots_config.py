"""config.json's IMAGE_ROOTS, DATASETS_DIR and MAX_IMAGE_FILE_MB."""

from pathlib import Path

import pytest

from core.config import config_from_dict, ensure_folders
from core.errors import UserError
from tests.unit.test_config import VALID


def test_default_roots_are_home_and_the_datasets_folder(tmp_path):
    config = config_from_dict(VALID, base_dir=tmp_path)
    roots = config.IMAGE_ROOTS
    assert roots == (Path.home().resolve(), (tmp_path / "datasets").resolve())
    assert config.MAX_IMAGE_FILE_MB == 200
    ensure_folders(config)
    assert (tmp_path / "datasets").is_dir()


def test_roots_resolve_and_an_empty_list_is_refused(tmp_path):
    config = config_from_dict({**VALID, "IMAGE_ROOTS": ["~/photos", "shared"]}, base_dir=tmp_path)
    roots = config.IMAGE_ROOTS
    assert roots == ((Path.home() / "photos").resolve(), (tmp_path / "shared").resolve())
    with pytest.raises(UserError, match="IMAGE_ROOTS is empty.*does not mean no restriction"):
        config_from_dict({**VALID, "IMAGE_ROOTS": []}, base_dir=tmp_path)
    with pytest.raises(UserError, match="IMAGE_ROOTS must be a list"):
        config_from_dict({**VALID, "IMAGE_ROOTS": "~"}, base_dir=tmp_path)
    with pytest.raises(UserError, match="IMAGE_ROOTS must list folder paths as strings, got 3"):
        config_from_dict({**VALID, "IMAGE_ROOTS": ["~", 3]}, base_dir=tmp_path)


def test_image_size_cap_is_a_positive_int(tmp_path):
    assert config_from_dict({**VALID, "MAX_IMAGE_FILE_MB": 50}, base_dir=tmp_path).MAX_IMAGE_FILE_MB == 50
    for bad, message in ((True, "must be a int"), ("50", "must be a int"), (0, "must be between 1 and 10240")):
        with pytest.raises(UserError, match=f"MAX_IMAGE_FILE_MB {message}"):
            config_from_dict({**VALID, "MAX_IMAGE_FILE_MB": bad}, base_dir=tmp_path)
