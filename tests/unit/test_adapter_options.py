"""The adapter-type options as users reach them: CLI flags, config bounds, the tab's form, presets."""

import pytest

from core.errors import UserError
from modules.lora_training.config import TrainConfig, config_from_dict


def _config(**options):
    return config_from_dict(TrainConfig, {"project": "p", "base_model": "m", **options})


def test_cli_network_and_factor():
    from modules.lora_training.cli import _train_options, build_parser

    argv = ["train", "--project", "p", "--base-model", "m", "--network", "lokr", "--factor", "8"]
    config = config_from_dict(TrainConfig, _train_options(build_parser().parse_args(argv)))
    assert (config.network, config.factor) == ("lokr", 8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"network": "locon"}, "network must be one of lora, dora, lokr, loha"),
        ({"factor": 0}, "factor must be -1"),
        ({"factor": -2}, "factor must be between -1 and 1024"),
        ({"factor": float("nan")}, "factor must be a whole number"),
    ],
)
def test_bad_adapter_options_are_refused_clearly(options, message):
    with pytest.raises(UserError, match=message):
        _config(**options)


def test_the_form_offers_every_type_and_shows_the_factor_for_lokr_only():
    from modules.lora_training.form import BY_NAME

    assert [value for value, _ in BY_NAME["network"].choice_labels] == ["lora", "dora", "lokr", "loha"]
    factor = BY_NAME["factor"]
    assert factor.shown({"network": "lokr"}) and not factor.shown({"network": "loha"})


def test_adapter_presets_are_valid_configs():
    from modules.lora_training.preset_files import read_preset

    for name, network in (("sdxl-loha-16gb", "loha"), ("flux-lokr-24gb", "lokr")):
        options = read_preset(name)["options"]
        assert _config(**options).network == network
