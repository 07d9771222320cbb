"""Tab plugins: ``modules/<name>/module.json`` + a package exposing an init function.

A plugin that fails to import, initialize or build its tab is logged and skipped; the
app still starts. Plugins are initialized in dependency order.

Tabs reach each other through ``gestionnaire.actions`` (:class:`TabActions`), never through
each other's widgets: a tab offers a named action ("generate.use_lora") with the components
it writes, another tab asks for it by name with the event that runs it.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError, shown_to_user
from core.i18n import Language, LiveStrings, module_strings, shown_message

log = logging.getLogger(__name__)


@dataclass
class PluginInfo:
    name: str
    folder: Path
    manifest: dict
    instance: object | None = None
    error: str | None = None


@dataclass
class TabAction:
    """What a tab lets other tabs do: ``run(payload)`` returns one update per component of ``outputs``;
    ``tab_id`` is the tab to show once it ran (None: stay)."""

    outputs: list
    run: Callable[[dict], list]
    tab_id: str | None = None


@dataclass
class _Request:
    name: str
    event: Callable  # an event listener such as ``button.click``
    payload: Callable[[], dict]
    unavailable: str | None


@dataclass
class _Link:
    parameter: str  # the page address's query parameter, e.g. "lora" in ``/?lora=cat.safetensors``
    name: str
    payload: Callable[[str], dict]
    strings: object = None  # the linking tab's strings: a refused value's message in the page's language


@dataclass
class TabActions:
    """Named actions tabs offer one another; requests are wired once every tab is built, so the
    order in which tabs are built does not matter."""

    offered: dict[str, TabAction] = field(default_factory=dict)
    requests: list[_Request] = field(default_factory=list)
    links: list[_Link] = field(default_factory=list)

    def offer(self, name: str, action: TabAction) -> None:
        self.offered[name] = action

    def request(self, name: str, *, event: Callable, payload: Callable[[], dict], unavailable: str | None = None):
        """Run action ``name`` with ``payload()`` when ``event`` fires. When no tab offers it,
        the event shows ``unavailable`` as an error (or does nothing when that is None)."""
        self.requests.append(_Request(name, event, payload, unavailable))

    def link(self, parameter: str, name: str, *, payload: Callable[[str], dict], strings=None) -> None:
        """A page opened at an address with ``?parameter=value`` runs action ``name`` with ``payload(value)``
        once it has loaded (a link to the app that opens a tab ready to use, e.g. a queue result's LoRA)."""
        self.links.append(_Link(parameter, name, payload, strings))

    def connect(self, tabs=None, *, page=None) -> list[str]:
        """Wire every request and, with ``page`` (the host's ``gr.Blocks``), every link (``tabs``: the host's
        ``gr.Tabs``); returns the names nobody offered."""
        missing = self._connect_links(tabs, page) if page is not None else []
        for request in self.requests:
            action = self.offered.get(request.name)
            if action is None:
                missing.append(request.name)
                if request.unavailable is not None:
                    request.event(_failing(request.unavailable), api_visibility="private")
                continue
            switch, outputs = _outputs_of(action, tabs)
            request.event(_runner(action, request.payload, switch=switch), outputs=outputs, api_visibility="private")
        self.requests.clear()
        return missing

    def _connect_links(self, tabs, page) -> list[str]:
        import gradio as gr

        missing = []
        for link in self.links:
            action = self.offered.get(link.name)
            if action is None:
                missing.append(link.name)
                continue
            switch, outputs = _outputs_of(action, tabs)
            # The load only reads the address; the action runs on the value's change, so a page opened
            # without the parameter sends no update to the action's components (an update would reset them).
            value = gr.State(None)
            page.load(_query_value(link.parameter), outputs=[value], api_visibility="private", show_progress="hidden")
            value.change(
                _link_runner(action, link, switch=switch), inputs=[value], outputs=outputs, api_visibility="private"
            )
        self.links.clear()
        return missing


def _outputs_of(action: TabAction, tabs) -> tuple[bool, list]:
    """Whether running ``action`` switches to its tab, and the components it updates (the tabs too, then)."""
    switch = tabs is not None and action.tab_id is not None
    return switch, [*action.outputs, tabs] if switch else list(action.outputs)


def _query_value(parameter: str) -> Callable:
    import gradio as gr

    def read(request):
        value = request.query_params.get(parameter) if request is not None else None
        return value or gr.skip()

    read.__annotations__["request"] = gr.Request  # the class itself: Gradio passes the request by this annotation
    return read


def _link_runner(action: TabAction, link: _Link, *, switch: bool) -> Callable:
    import gradio as gr

    def run(value: str) -> list:
        try:
            updates = list(action.run(link.payload(value)))
        except UserError as exc:  # a stale or edited link: say so, leave the page as it is
            gr.Warning(shown_message(exc, link.strings))
            return [gr.skip()] * (len(action.outputs) + switch)
        return [*updates, gr.Tabs(selected=action.tab_id)] if switch else updates

    return run


def _runner(action: TabAction, payload: Callable[[], dict], *, switch: bool) -> Callable[[], list]:
    def run() -> list:
        import gradio as gr

        updates = list(action.run(payload()))
        return [*updates, gr.Tabs(selected=action.tab_id)] if switch else updates

    return run


def _failing(message: str) -> Callable[[], None]:
    def fail() -> None:

        raise shown_to_user(message)

    return fail


@dataclass
class PluginManager:
    """The host's module manager (``gestionnaire``): lets one tab reach another."""

    modules_dir: Path
    package: str = "modules"
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    tabs: object | None = None  # the host's gr.Tabs, set while the UI is built
    page: object | None = None  # the host's gr.Blocks, set while the UI is built (links are wired to its load)
    actions: TabActions = field(default_factory=TabActions)
    queue: object | None = None  # the server's JobRunner (core/job_runner.py): tabs register their job kinds

    def discover(self) -> list[PluginInfo]:
        found = []
        for manifest_path in sorted(Path(self.modules_dir).glob("*/module.json")):
            folder = manifest_path.parent
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
                if not isinstance(manifest, dict) or not isinstance(manifest.get("init_function"), str):
                    raise ValueError("module.json needs an object with an 'init_function' string")
            except (OSError, ValueError) as exc:
                log.error("plugin %s skipped: bad module.json: %s", folder.name, exc)
                self.plugins[folder.name] = PluginInfo(folder.name, folder, {}, error=f"bad module.json: {exc}")
                continue
            found.append(PluginInfo(manifest.get("name", folder.name), folder, manifest))
        return _dependency_order(found)

    def initialize_all(self, *, global_translations: dict, model_manager, global_config) -> None:
        for info in self.discover():
            self.plugins[info.name] = info
            missing = [d for d in info.manifest.get("dependencies", []) if d not in self.loaded_names()]
            if missing:
                info.error = f"missing dependencies: {', '.join(missing)}"
                log.error("plugin %s skipped: %s", info.name, info.error)
                continue
            try:
                module = importlib.import_module(f"{self.package}.{info.folder.name}")
                init = getattr(module, info.manifest["init_function"])
                info.instance = init(global_translations, model_manager, self, global_config)
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                log.exception("plugin %s failed to initialize; skipped", info.name)

    def loaded_names(self) -> list[str]:
        return [name for name, info in self.plugins.items() if info.instance is not None]

    def get(self, name: str):
        info = self.plugins.get(name)
        return info.instance if info else None

    def create_tabs(self, language: str | Language, *, catalogs: dict | None = None, page=None) -> None:
        """Call each plugin's ``create_tab`` inside the caller's ``gr.Tabs``. With a :class:`Language` the
        tab gets :class:`LiveStrings` (following the language switch, ``page`` being the app's PageTexts),
        with a language code a plain dict."""
        import gradio as gr

        for info in self.plugins.values():
            if info.instance is None:
                continue
            strings = _tab_strings(info.manifest.get("language", {}), language, catalogs=catalogs, page=page)
            try:
                info.instance.create_tab(strings)
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                info.instance = None
                log.exception("plugin %s failed to build its tab; skipped", info.name)
                gr.Markdown(f"Plugin **{info.name}** failed to load: {info.error}")
        for name in self.actions.connect(self.tabs, page=self.page):
            log.warning("no loaded tab offers the action %r", name)

    def failures(self) -> dict[str, str]:
        return {name: info.error for name, info in self.plugins.items() if info.error}


def _tab_strings(table: dict, language: str | Language, *, catalogs: dict | None, page):
    if isinstance(language, Language):
        return LiveStrings(table, language=language, catalogs=catalogs or {}, page=page)
    return module_strings(table, language)


def _dependency_order(plugins: list[PluginInfo]) -> list[PluginInfo]:
    by_name = {p.name: p for p in plugins}
    ordered: list[PluginInfo] = []
    visiting: set[str] = set()

    def visit(plugin: PluginInfo) -> None:
        if plugin in ordered or plugin.name in visiting:
            return
        visiting.add(plugin.name)
        for dep in plugin.manifest.get("dependencies", []):
            if dep in by_name:
                visit(by_name[dep])
        ordered.append(plugin)

    for plugin in plugins:
        visit(plugin)
    return ordered
