"""LoRA Studio: the host Gradio app (ModelManager + tab plugins from modules/)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "config.json"
LANGUAGE_NAMES = {"en": "English", "fr": "Français"}
SWITCH_LABELS = {"en": "Language", "fr": "Langue"}

log = logging.getLogger("lora_studio")


def build_app(config, *, model_manager=None, modules_dir: Path | None = None, config_path: Path | None = None):
    """The whole UI as a ``gr.Blocks``; nothing is loaded until a request needs it.

    The language switch in the header saves LANGUAGE into ``config_path`` (when given) and re-labels the
    page in place and for every page opened after."""
    import gradio as gr

    from core.config import LANGUAGES
    from core.i18n import Language, LiveStrings, Text, load_catalog, load_table
    from core.job_queue import JobStore
    from core.job_queue_api import QueueApi
    from core.job_runner import JobRunner
    from core.model_manager import ModelManager
    from core.page_texts import PageTexts
    from core.plugins import PluginManager

    language, page = Language(config.LANGUAGE), PageTexts()
    catalogs = {code: load_catalog(ROOT / "locales", code) for code in LANGUAGES}
    tables = {code: load_table(ROOT / "locales", code) for code in LANGUAGES}
    strings = LiveStrings(tables, language=language, catalogs=catalogs, page=page)
    if model_manager is None:
        model_manager = ModelManager(models_dir=config.MODELS_DIR, loras_dir=config.LORAS_DIR, device=config.DEVICE)
    queue = JobRunner(JobStore(config.QUEUE_DB, max_waiting=config.QUEUE_MAX_WAITING))
    plugins = PluginManager(modules_dir=modules_dir or ROOT / "modules", queue=queue)
    plugins.initialize_all(global_translations=strings, model_manager=model_manager, global_config=config)
    with gr.Blocks(title=strings["app_title"]) as demo:
        switch = _header(strings, language=language)
        with gr.Tabs() as tabs:
            plugins.tabs = tabs  # lets a tab switch to another (e.g. "Use in Generate")
            plugins.page = demo  # lets a link (``/?lora=...``) open a tab ready to use
            plugins.create_tabs(language, catalogs=catalogs, page=page)
        failures = plugins.failures()
        if failures:
            listed = "\n".join(f"- **{name}**: {error}" for name, error in failures.items())
            page.markdown(Text(lambda: f"{strings['plugins_failed']}\n{listed}"))
        QueueApi(queue, strings=strings).register()
        page.collect(demo)
        _wire_language(demo, switch=switch, page=page, save=_language_saver(config_path, language))
    queue.start(resume_interrupted=config.QUEUE_RESUME_INTERRUPTED)  # once every tab registered its job kinds
    demo.model_manager = model_manager
    demo.plugins = plugins
    demo.job_runner = queue
    return demo


def _header(strings, *, language):
    """The title and the language switch (labelled in every language: it is how one finds one's own)."""
    import gradio as gr

    from core.config import LANGUAGES
    from core.i18n import Text

    with gr.Row(equal_height=True):
        with gr.Column(scale=8):
            strings.page.markdown(Text(lambda: f"# {strings['app_title']}\n{strings['app_subtitle']}"))
        with gr.Column(scale=1, min_width=170):
            return gr.Dropdown(
                choices=[(LANGUAGE_NAMES[code], code) for code in LANGUAGES],
                value=language.code,
                label=" / ".join(SWITCH_LABELS[code] for code in LANGUAGES),
                elem_id="language",
                interactive=True,
            )


def _language_saver(config_path: Path | None, language):
    from core.config import save_language

    def save(code: str) -> None:
        if config_path is not None:
            save_language(config_path, code)
        language.code = code
        log.info("language set to %s%s", code, f" in {config_path}" if config_path else "")

    return save


def _wire_language(demo, *, switch, page, save) -> None:
    """Choosing a language saves it, re-labels the open page and rebuilds the page config that later page
    loads get, so they arrive in the new language."""
    from core.errors import UserError, shown_to_user

    def on_switch(code: str) -> list:
        try:
            save(code)
        except (UserError, OSError) as exc:
            raise shown_to_user(exc) from exc
        page.apply()
        switch.value = code
        demo.config = demo.get_config_file()
        return page.updates()

    switched = switch.input(on_switch, inputs=[switch], outputs=page.outputs, api_name="set_language")
    for refresher in page.refreshers:
        switched.then(refresher.fn, inputs=refresher.inputs, outputs=refresher.outputs, api_visibility="private")


def parse_auth(value: str) -> tuple[str, str] | None:
    """``"user:password"`` → ``(user, password)``; empty → no authentication."""
    from core.errors import UserError

    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("authentication takes user:password")
    return user, password


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA Studio: generate images and train LoRAs.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="path to config.json")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--listen", action="store_true", help="serve on all interfaces (default: 127.0.0.1 only)")
    parser.add_argument("--auth", help="user:password required to open the app (needed with --listen)")
    parser.add_argument(
        "--insecure-no-auth", action="store_true", help="allow --listen without --auth (anyone on the network gets in)"
    )
    parser.add_argument("--no-demo-models", action="store_true", help="do not build the tiny demo models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from core.config import ensure_folders, load_config
    from core.errors import UserError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except UserError as exc:
        print(f"error: {exc}")
        return 2
    try:
        auth = parse_auth(args.auth or config.AUTH)
    except UserError as exc:
        print(f"error: {exc}")
        return 2
    if args.listen and auth is None and not args.insecure_no_auth:
        print(
            "error: --listen exposes the app to your network; add --auth user:password "
            '(or "AUTH": "user:password" in config.json), or --insecure-no-auth.'
        )
        return 2
    ensure_folders(config)
    from core.console import quiet_known_noise

    quiet_known_noise()
    if config.BUILD_DEMO_MODELS and not args.no_demo_models:
        from model_formats.demo_models import ensure_demo_models

        log.info(
            "Demo models (tiny, random weights, for trying the app) in %s: built once on the first start, "
            "about a minute; real models go into the same folder.",
            config.MODELS_DIR,
        )
        ensure_demo_models(config.MODELS_DIR)
    demo = build_app(config, config_path=args.config)
    demo.queue(default_concurrency_limit=1)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    # quiet: Gradio's own banner suggests share=True; this app is shared with --listen (and --auth).
    demo.launch(
        quiet=True,
        prevent_thread_lock=True,
        server_name=host,
        server_port=args.port,
        allowed_paths=[str(folder) for folder in config.served_folders()],
        show_error=True,
        auth=auth,
        app_kwargs=_login_throttle() if auth else None,
    )
    where = f"http://127.0.0.1:{args.port}/" if host == "127.0.0.1" else f"port {args.port} of every network interface"
    print(f"LoRA Studio is running: open {where} (Ctrl+C stops it)", flush=True)
    demo.block_thread()
    return 0


def _login_throttle() -> dict:
    """FastAPI arguments adding the per-client limit on failed logins."""
    from starlette.middleware import Middleware

    from core.login_throttle import LoginThrottle

    return {"middleware": [Middleware(LoginThrottle)]}


if __name__ == "__main__":
    raise SystemExit(main())
