import json
import sys

import pytest

from core.plugins import PluginManager


def _write_plugin(root, name, body, *, dependencies=()):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "module.json").write_text(
        json.dumps({"name": name, "init_function": "initialize", "dependencies": list(dependencies), "language": {}})
    )
    (folder / "__init__.py").write_text(body)


GOOD = """
class Tab:
    def __init__(self, manager):
        self.manager = manager
    def create_tab(self, strings):
        pass

def initialize(global_translations, model_manager, gestionnaire, global_config):
    return Tab(gestionnaire)
"""


def test_broken_plugins_are_skipped_and_good_ones_load(tmp_path, monkeypatch):
    package = tmp_path / "plugpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _write_plugin(package, "good", GOOD)
    _write_plugin(package, "import_error", "import does_not_exist_anywhere\n")
    _write_plugin(package, "init_error", "def initialize(*args):\n    raise RuntimeError('boom')\n")
    _write_plugin(package, "needs_missing", GOOD, dependencies=["absent"])
    _write_plugin(package, "after_good", GOOD, dependencies=["good"])
    (package / "bad_manifest").mkdir()
    (package / "bad_manifest" / "module.json").write_text("[1, 2]")
    monkeypatch.syspath_prepend(str(tmp_path))

    manager = PluginManager(modules_dir=package, package="plugpkg")
    manager.initialize_all(global_translations={}, model_manager=None, global_config=None)

    assert manager.loaded_names() == ["good", "after_good"]
    assert manager.get("after_good").manager is manager
    failures = manager.failures()
    assert "ModuleNotFoundError" in failures["import_error"]
    assert "boom" in failures["init_error"]
    assert "absent" in failures["needs_missing"]
    assert "bad module.json" in failures["bad_manifest"]
    sys.modules.pop("plugpkg", None)


def test_a_tab_runs_another_tabs_action_by_name():
    import gradio as gr

    from core.plugins import TabAction, TabActions

    actions = TabActions()
    with gr.Blocks() as demo, gr.Tabs() as tabs:
        with gr.Tab("Asker", id="asker"):
            send = gr.Button("Send")
            lonely = gr.Button("Nobody answers")
        # Asked for before it is offered: requests are wired once every tab is built.
        actions.request("target.fill", event=send.click, payload=lambda: {"text": "hello"})
        actions.request("absent.action", event=lonely.click, payload=dict, unavailable="The other tab is not loaded.")
        with gr.Tab("Target", id="target"):
            box = gr.Textbox()
        actions.offer("target.fill", TabAction([box], lambda payload: [payload["text"].upper()], tab_id="target"))
        assert actions.connect(tabs) == ["absent.action"]

    handlers = {target: fn for fn in demo.fns.values() for target, _ in fn.targets}
    assert handlers[send._id].outputs == [box, tabs]
    text, selected = handlers[send._id].fn()
    assert text == "HELLO" and selected.selected == "target"
    with pytest.raises(gr.Error, match="not loaded"):
        handlers[lonely._id].fn()
