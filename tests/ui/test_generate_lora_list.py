"""The Generate tab's LoRA list in a browser: one entry per LoRA, the other family marked and refused."""

import re

import pytest
import torch

from families.flux import FluxFamily
from modules.lora_training.main_file import write_main_lora
from tests.conftest import write_config
from tests.demo_names import DEMO_FLUX_NAME
from tests.server import running_app

pytestmark = pytest.mark.ui


def _flux_lora(path) -> None:
    layers = {"transformer": {"x.lora_A.weight": torch.ones(1, 4), "x.lora_B.weight": torch.ones(4, 1)}}
    metadata = {"lora_studio.family": "flux", "lora_studio.trigger_word": "ohwx"}
    keys = FluxFamily.main_file_keys
    write_main_lora(path, layers, {"transformer": {"r": 1, "lora_alpha": 1}}, metadata=metadata, keys=keys)


def test_other_family_lora_is_marked_and_refused(tmp_path, models_dir, browser_page, screenshot):
    page = browser_page
    config = write_config(tmp_path, models_dir)
    _flux_lora(tmp_path / "loras" / "my_cat.safetensors")
    _flux_lora(tmp_path / "loras" / "webui" / "my_cat.safetensors")
    (tmp_path / "loras" / "broken.safetensors").write_bytes(b"\x80\x04not safetensors")
    with running_app(config, tmp_path / "app.log") as url:
        page.goto(url)
        page.get_by_text("LoRA Studio").first.wait_for(timeout=60_000)
        page.locator("#generate-prompt textarea").fill("a cat")
        page.locator("#generate-lora-1 input").click()
        marked = page.get_by_role("option", name="my_cat (Flux, not for SDXL) · trigger: ohwx", exact=True)
        marked.wait_for(timeout=10_000)
        assert page.get_by_role("option", name="broken (unreadable: not a LoRA file)", exact=True).count() == 1
        assert page.get_by_role("option").count() == 2, "one entry per LoRA, the webui copy left out"
        screenshot("list")
        marked.click()
        page.locator("#generate-button").click()
        page.get_by_text("my_cat.safetensors is a Flux LoRA; the selected model is SDXL").first.wait_for(timeout=60_000)
        screenshot("refused")

        model = page.locator("#generate-model input")
        model.click()
        model.fill(DEMO_FLUX_NAME)
        page.get_by_role("option", name=DEMO_FLUX_NAME, exact=True).click()
        page.locator("#generate-lora-2 input").click()
        page.get_by_role("option", name="my_cat · Flux · trigger: ohwx", exact=True).wait_for(timeout=10_000)
        page.keyboard.press("Escape")

        # A link to the app naming a LoRA (the queue view's result) opens Generate ready to use it: the
        # LoRA in the first slot, a model of its family, its trigger word in the prompt.
        page.goto(f"{url}?lora=my_cat.safetensors")
        page.wait_for_function(
            "() => document.querySelector('#generate-lora-1 input')?.value === 'my_cat · Flux · trigger: ohwx'",
            timeout=30_000,
        )
        assert page.locator("#generate-model input").input_value() == DEMO_FLUX_NAME
        assert page.locator("#generate-prompt textarea").input_value() == "ohwx, "
        page.goto(f"{url}?lora=<b>gone</b>.safetensors")
        notice = page.get_by_text(re.compile("The link names LoRA .*which is not a usable LoRA"))
        notice.wait_for(timeout=30_000)
        assert "'<b>gone</b>.safetensors'" in notice.inner_text(), "markup in a link is shown as text"
        assert page.locator("#generate-lora-1 input").input_value() == ""
        page.locator("#generate-lora-1 input").click()
        page.get_by_role("option", name="my_cat (Flux, not for SDXL) · trigger: ohwx", exact=True).wait_for()
        screenshot("link")
