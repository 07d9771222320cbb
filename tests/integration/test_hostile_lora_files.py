"""LoRA files from other tools, or hostile ones, in loras/: each gets a clear UserError naming the file
(Generate, inspect, export), the others keep working, and the loaded model is left exactly as it was.
One tiny SDXL pipeline for the whole module; the files are built from a copy of its U-Net."""

from __future__ import annotations

import copy
import math
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.errors import UserError
from core.model_manager import GenerationRequest, LoraChoice, ModelManager
from families.adapter_configs import adapter_config
from modules.generate.tab import GenerateTab
from modules.lora_training.main_file import adapter_metadata_json
from tests.conftest import ROOT
from tests.demo_names import DEMO_SDXL_NAME

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FAMILY = {"lora_studio.family": "sdxl"}


@pytest.fixture(scope="module")
def setup(models_dir, tmp_path_factory):
    """(manager with the tiny SDXL loaded, loras folder, {network: (tensors, packed config)})."""
    from peft import get_peft_model_state_dict

    loras = tmp_path_factory.mktemp("hostile_loras")
    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    manager.load_model(DEMO_SDXL_NAME)
    scratch = copy.deepcopy(manager._pipe.unet)
    sources = {}
    generator = torch.Generator().manual_seed(0)
    for network in ("lora", "loha", "lokr"):
        config = adapter_config(network, rank=4, alpha=4, targets=TARGETS)
        scratch.add_adapter(config, adapter_name=network)
        with torch.no_grad():
            for name, param in scratch.named_parameters():
                if f".{network}." in name or name.endswith(f".{network}"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        state = get_peft_model_state_dict(scratch, adapter_name=network)
        sources[network] = ({f"unet.{k}": v.contiguous() for k, v in state.items()}, config.to_dict())
    return manager, loras, sources


def _write(setup, name: str, network: str, *, config: dict | None = None, raw_metadata=None, tensors=None) -> str:
    _, loras, sources = setup
    base_tensors, base_config = sources[network]
    packed = adapter_metadata_json({"unet": {**base_config, **(config or {})}})
    metadata = {**FAMILY, "format": "pt", "lora_adapter_metadata": packed if raw_metadata is None else raw_metadata}
    save_file(tensors if tensors is not None else base_tensors, str(loras / name), metadata=metadata)
    return name


def _image(manager, *loras: LoraChoice) -> np.ndarray:
    request = GenerationRequest(
        model=DEMO_SDXL_NAME, prompt="a photo", steps=1, width=64, height=64, seed=7, loras=tuple(loras)
    )
    return np.asarray(manager.generate(request).image, dtype=np.float32)


def _out(manager, *loras: LoraChoice) -> torch.Tensor:
    """The U-Net's output on fixed inputs with ``loras`` applied as Generate applies them (a whole
    generation costs seconds on a busy 2-core machine; one denoiser call shows the same weights)."""
    manager.load_model(DEMO_SDXL_NAME)  # again after a failed load dropped the pipeline
    manager._apply_loras(tuple(loras))
    unet = manager._pipe.unet
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, text, generator=generator), "time_ids": torch.zeros(1, 6)}
    sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


HOSTILE_HEADERS = {
    "redos_exclude": ("loha", {"exclude_modules": "(.*.*)*x"}, "regular expression"),
    "redos_targets": ("lokr", {"target_modules": "(.*.*)*to_q"}, "regular expression"),
    "regex_in_list": ("loha", {"target_modules": ["to_q", "(a+)+$"]}, "not a plain layer name"),
    "huge_rank": ("loha", {"r": 16384}, "unet.r"),
    "rank_text": ("loha", {"r": "abc"}, "unet.r"),
    "rank_negative": ("loha", {"r": -3}, "unet.r"),
    "rank_bool": ("lokr", {"r": True}, "unet.r"),
    "rank_not_the_weights": ("loha", {"r": 8, "alpha": 8}, "rank 4"),
    "nan_alpha_loha": ("loha", {"alpha": math.nan}, "unet.alpha"),
    "nan_alpha_lora": ("lora", {"lora_alpha": math.nan}, "unet.lora_alpha"),
    "huge_alpha": ("lora", {"lora_alpha": 1e300}, "unet.lora_alpha"),
    "pattern_regex": ("loha", {"rank_pattern": {"(a+)+$": 4}}, "rank_pattern"),
    "pattern_negative": (
        "loha",
        {"rank_pattern": {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": -1}},
        "-1",
    ),
    "pattern_nan_alpha": ("lora", {"alpha_pattern": {"to_q": math.nan}}, "alpha_pattern"),
    "modules_to_save": ("loha", {"modules_to_save": ["conv_in"]}, "modules_to_save"),
    "layers_to_transform": ("lokr", {"layers_to_transform": [0]}, "layers_to_transform"),
    "type_says_lora": ("loha", {"peft_type": "LORA"}, "weights are LOHA"),
    "unknown_type": ("loha", {"peft_type": "IA3"}, "peft_type"),
}
HOSTILE_JSON = {"meta_number": "5", "meta_list": "[1, 2]", "meta_not_json": "{oops", "meta_deep": "[" * 50_000}


def _hostile_files(setup) -> dict[str, str]:
    """{file: words its message must hold}."""
    files = {}
    for name, (network, config, words) in HOSTILE_HEADERS.items():
        files[_write(setup, f"{name}.safetensors", network, config=config)] = words
    for name, raw in HOSTILE_JSON.items():
        files[_write(setup, f"{name}.safetensors", "loha", raw_metadata=raw)] = "lora_adapter_metadata"
    return files


def test_hostile_headers_are_refused_by_generate_inspect_and_export(setup, tmp_path):
    from core.adapter_files import read_lora_state
    from modules.lora_training.export import export_lora, inspect_lora

    manager, loras, _ = setup
    files = _hostile_files(setup)
    good = _write(setup, "good_lokr.safetensors", "lokr")
    base = _out(manager)
    details = {info.name: info for info in manager.lora_details()}
    assert details[good].problem == "" and details[good].family == "sdxl"
    for name, words in files.items():
        assert name in details[name].problem and words in details[name].problem, (name, details[name].problem)
        started = time.perf_counter()
        for action in (
            lambda name=name: _image(manager, LoraChoice(name, 1.0)),
            lambda name=name: read_lora_state(loras / name),
            lambda name=name: inspect_lora(loras / name),
            lambda name=name: export_lora(loras / name, fmt="kohya", out=tmp_path / f"out_{name}"),
        ):
            with pytest.raises(UserError, match="lora_adapter_metadata|adapter settings") as refused:
                action()
            assert name in str(refused.value), (name, str(refused.value))
        assert time.perf_counter() - started < 30, name  # a pattern that backtracks would take hours
    assert not torch.equal(_out(manager, LoraChoice(good, 1.0)), base)
    assert torch.equal(_out(manager), base), "the base model changed"


def _tuner_layers(manager) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in manager._pipe.unet.modules())


def test_a_failed_load_leaves_the_model_as_it_was(setup):
    """Files that pass the header checks but fail inside peft: after each, the base model's output is
    unchanged, no layer of the failed adapter is left, and good LoKr / LoHa / LoRA files load after them."""
    manager, _, sources = setup
    tensors = sources["loha"][0]
    bad = {
        "targets_not_found": dict(config={"target_modules": ["no_such_layer"]}),
        # peft adds LoHa to the to_q layers it meets first, then stops at a LayerNorm it cannot adapt.
        "half_injected": dict(config={"target_modules": ["to_q", "norm1"]}),
        "weights_missing": dict(tensors={k: v for k, v in tensors.items() if not k.endswith("hada_w2_b")}),
    }
    base = _out(manager)
    layers_before = _tuner_layers(manager)
    for case, options in bad.items():
        name = _write(setup, f"{case}.safetensors", "loha", **options)
        with pytest.raises(UserError, match=case):
            _image(manager, LoraChoice(name, 1.0))
        assert torch.equal(_out(manager), base), f"{case}: a failed load changed the base model's output"
        assert _tuner_layers(manager) <= layers_before, case
    for network in ("lokr", "loha", "lora"):
        good = _write(setup, f"good_{network}.safetensors", network)
        assert not torch.equal(_out(manager, LoraChoice(good, 1.0)), base), network
    assert torch.equal(_out(manager), base)


def test_a_lokr_or_loha_header_adapting_layers_the_file_lacks_is_refused_before_peft_allocates(setup):
    """Review 9 #16: peft allocates the header's rank on every layer target_modules match; a file holding one
    of them is refused first, naming the file, and nothing is added to the model."""
    manager, _, sources = setup
    manager.load_model(DEMO_SDXL_NAME)
    layers_before = _tuner_layers(manager)
    for network in ("loha", "lokr"):
        tensors = sources[network][0]
        first = sorted(tensors)[0].rsplit(".hada_" if network == "loha" else ".lokr_", 1)[0]
        one = {k: v for k, v in tensors.items() if k.startswith(f"{first}.")}
        name = _write(setup, f"one_layer_{network}.safetensors", network, tensors=one)
        with pytest.raises(
            UserError, match=rf"one_layer_{network}.safetensors.*adapts \d+ layers.*holds weights for 1"
        ):
            manager._apply_loras((LoraChoice(name, 1.0),))
        assert _tuner_layers(manager) == layers_before, network


def test_the_same_lora_in_two_slots_counts_once_at_the_sum(setup):
    manager, _, _ = setup
    name = _write(setup, "twice.safetensors", "lora")
    base, double = _out(manager), _out(manager, LoraChoice(name, 2.0))
    assert torch.equal(_out(manager, LoraChoice(name, 1.0, slot=1), LoraChoice(name, 1.0, slot=2)), double)
    assert torch.equal(_out(manager, LoraChoice(name, 0.5, slot=1), LoraChoice(name, -0.5, slot=3)), base)
    with pytest.raises(UserError, match=r"slots 1, 2.*6"):
        _image(manager, LoraChoice(name, 3.0, slot=1), LoraChoice(name, 3.0, slot=2))


def _loaded_adapters(manager) -> set[str]:
    return {name for names in manager._pipe.get_list_adapters().values() for name in names}


def test_one_file_under_several_spellings_is_one_adapter_and_unused_ones_are_unloaded(setup):
    """Review 9 #3: "x", "./x", an absolute path: one adapter, one weight sum; old adapters are unloaded."""
    from core.model_manager import KEPT_ADAPTERS

    manager, loras, _ = setup
    manager.load_model(DEMO_SDXL_NAME)
    name = _write(setup, "spelled.safetensors", "lora")
    spellings = [name, f"./{name}", f"././{name}", str(loras / name)]
    for spelling in spellings:
        manager._apply_loras((LoraChoice(spelling, 1.0),))
    assert len(manager._adapters) == len(_loaded_adapters(manager)) <= KEPT_ADAPTERS
    assert sum(str(loras / name) in key for key in manager._adapters) == 1
    with pytest.raises(UserError, match=r"slots 1, 2, 3, 4.*8"):
        manager._apply_loras(tuple(LoraChoice(s, 2.0, slot=i) for i, s in enumerate(spellings, start=1)))
    with pytest.raises(UserError, match=r"add up"):
        _image(manager, *(LoraChoice(s, 2.0, slot=i) for i, s in enumerate(spellings[:3], start=1)))
    for index in range(KEPT_ADAPTERS + 2):
        other = _write(setup, f"other{index}.safetensors", "lora")
        manager._apply_loras((LoraChoice(other, 1.0), LoraChoice(f"./{name}", 1.0)))
    assert len(_loaded_adapters(manager)) == len(manager._adapters) == KEPT_ADAPTERS


def test_a_lora_with_header_alpha_applies_at_alpha_over_rank(setup):
    """The header's alpha / r is folded into the weights (no setting of the file reaches peft): a file
    at alpha 8 (rank 4) changes the output as the same file at alpha 4 does at weight 2."""
    manager, _, _ = setup
    half = _write(setup, "alpha4.safetensors", "lora", config={"lora_alpha": 4})
    full = _write(setup, "alpha8.safetensors", "lora", config={"lora_alpha": 8})
    base = _out(manager)
    change = _out(manager, LoraChoice(full, 1.0)) - base
    assert torch.allclose(change, _out(manager, LoraChoice(half, 2.0)) - base, atol=1e-5)
    assert not torch.allclose(change, _out(manager, LoraChoice(half, 1.0)) - base, atol=1e-5)


def test_an_fp8_lora_loads(setup):
    manager, _, sources = setup
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in sources["loha"][0].items()}
    name = _write(setup, "fp8.safetensors", "loha", tensors=tensors)
    assert not torch.equal(_out(manager, LoraChoice(name, 1.0)), _out(manager))


def _odd_header_file(path, header: str) -> None:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)


ODD_ENTRIES = {
    "shape_1e400": '{"unet.a.lora_A.weight": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}',
    "shape_fraction": '{"unet.a.lora_A.weight": {"dtype": "F32", "shape": [0.5, 2], "data_offsets": [0, 4]}}',
    "shape_text": '{"unet.a.lora_A.weight": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}',
    "offset_bool": '{"unet.a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [false, true]}}',
    "shape_huge_empty": '{"unet.a.lora_A.weight": {"dtype": "F32", "shape": [0, 99999999999999999999], '
    '"data_offsets": [0, 0]}}',
    "deep": '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


def test_one_odd_header_never_drops_the_lora_list(setup, tmp_path):
    """Each odd file is listed with its problem; the good one next to it is listed as usable."""
    manager = ModelManager(models_dir=setup[0].models_dir, loras_dir=tmp_path, device="cpu")
    for name, header in ODD_ENTRIES.items():
        _odd_header_file(tmp_path / f"{name}.safetensors", header)
    save_file(setup[2]["lora"][0], str(tmp_path / "fine.safetensors"), metadata=FAMILY)
    details = {info.name: info for info in manager.lora_details()}
    assert details["fine.safetensors"].problem == "" and details["fine.safetensors"].family == "sdxl"
    for name in ODD_ENTRIES:
        assert "corrupt or not a LoRA file" in details[f"{name}.safetensors"].problem, name
    tab = GenerateTab(model_manager=manager, config=object(), translations={})  # what create_tab lists
    strings = {"lora_entry": "{name} · {family}", "lora_unreadable": "{name} (unreadable)"}
    choices = dict((value, label) for label, value in tab.lora_choices(DEMO_SDXL_NAME, strings))
    assert choices["fine.safetensors"] == "fine · SDXL" and choices["deep.safetensors"] == "deep (unreadable)"


def test_batch_numbers_too_large_for_a_float_are_user_errors():
    from modules.generate.batch import BatchDefaults, parse_batch

    defaults = BatchDefaults(model="m.safetensors", size_for=lambda model: 1024)
    big = "1" + "0" * 400
    for text, column in (
        (f'[{{"prompt": "a", "guidance": {big}}}]', "guidance"),
        (f'[{{"prompt": "a", "loras": [{{"name": "x", "weight": {big}}}]}}]', "loras"),
        (f'[{{"prompt": "a", "steps": {big}.5}}]', "steps"),
    ):
        with pytest.raises(UserError, match=f"Row 1, column {column}"):
            parse_batch(text, defaults=defaults, base_seed=0)


def test_a_lycoris_header_is_parsed_once(setup):
    """5 MB of metadata and 2,000 layers: read once, not once per tensor name (that took minutes)."""
    from core.adapter_files import lycoris_network

    config = {**setup[2]["lokr"][1], "pad": "x" * 5_000_000}
    metadata = {"lora_adapter_metadata": adapter_metadata_json({"unet": config})}
    keys = [f"unet.m{i}.lokr_w1" for i in range(2000)]
    started = time.perf_counter()
    assert lycoris_network(keys, metadata) == "lokr"
    assert time.perf_counter() - started < 5


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_loading_a_fifo_named_as_a_lora_returns_at_once(tmp_path):
    """safe_open on a FIFO blocks holding the GIL (every thread freezes): the loader opens the file
    once, without blocking, and refuses what is not a regular file. A subprocess, so a regression
    fails by its timeout instead of freezing the test run."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    code = (
        "import sys; from pathlib import Path; from core.adapter_files import load_lora_file\n"
        "from core.errors import UserError\n"
        f"try:\n    load_lora_file(None, Path({str(fifo)!r}), adapter_name='a')\n"
        "except UserError as exc:\n    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "refused:" in done.stdout and "not a regular file" in done.stdout, done.stderr[-2000:]


def test_a_multi_value_alpha_in_a_lycoris_copy_is_a_user_error(setup, tmp_path):
    from modules.lora_training.export import inspect_lora

    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.ones(4, 2),
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_b": torch.ones(2, 4),
        "lora_unet_mid_block_attentions_0_proj_in.hada_w2_a": torch.ones(4, 2),
        "lora_unet_mid_block_attentions_0_proj_in.hada_w2_b": torch.ones(2, 4),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor([1.0, 2.0]),
    }
    save_file(tensors, str(tmp_path / "webui.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    with pytest.raises(UserError, match="webui.safetensors"):
        inspect_lora(tmp_path / "webui.safetensors")


def test_the_header_json_is_never_sent_to_peft(setup):
    """A LoRA's own settings (init_lora_weights "pissa" would rewrite the base weights; layer_replication
    would copy layers) never reach peft: the LoRA path builds its config from the tensors alone."""
    manager, _, _ = setup
    name = _write(setup, "pissa.safetensors", "lora", config={"init_lora_weights": "pissa", "bias": "all"})
    base = _out(manager)
    assert not torch.equal(_out(manager, LoraChoice(name, 1.0)), base)
    assert manager._pipe.unet.peft_config[manager.loaded_adapter(name)].init_lora_weights is True
    assert torch.equal(_out(manager), base)
