"""The training status column: status line, progress bar, loss plot, samples and log, polled each second."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr
import pandas as pd

from core.i18n import translate


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render_status(snapshot: dict, strings: dict) -> str:
    state = snapshot["state"]
    if state == "idle":
        return translate("status_idle", strings)
    values = {
        "project": snapshot["project"],
        "stage": snapshot.get("prep_stage", ""),
        "done": snapshot.get("prep_done", 0),
        "total": snapshot.get("prep_total", 0) if state == "preparing" else snapshot.get("total_steps", 0),
        "step": snapshot.get("step", 0),
        "message": snapshot.get("message", ""),
    }
    key = {"starting": "status_preparing"}.get(state, f"status_{state}")
    return translate(key, strings, **values)


def render_progress(snapshot: dict, strings: dict) -> str:
    total = snapshot.get("total_steps") or 0
    if not total:
        return ""
    step = snapshot.get("step", 0)
    text = translate(
        "progress",
        strings,
        step=step,
        total=total,
        s_per_step=snapshot.get("s_per_step") or 0.0,
        eta=format_eta(snapshot.get("eta_seconds")),
    )
    return f'<progress value="{step}" max="{total}" style="width:100%"></progress><div>{text}</div>'


def loss_frame(snapshot: dict) -> pd.DataFrame:
    losses = snapshot.get("losses", [])
    return pd.DataFrame(losses, columns=["step", "loss"]) if losses else pd.DataFrame({"step": [], "loss": []})


class StatusView:
    """Widgets showing ``jobs.snapshot()``; a new run state refreshes the prepared-images gallery and
    a newly saved LoRA bumps ``lora_version`` (a ``gr.State`` other tabs can listen to)."""

    def __init__(self, *, jobs, strings: dict) -> None:
        self.jobs = jobs
        self.strings = strings

    def build(self) -> None:
        t = self.strings
        self.status = gr.Markdown(translate("status_idle", t), elem_id="lt-status")
        self.progress = gr.HTML(elem_id="lt-progress")
        self.loss_plot = gr.LinePlot(
            pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", label=translate("loss", t), elem_id="lt-loss"
        )
        self.samples = gr.Gallery(label=translate("samples", t), columns=4, height=200, elem_id="lt-samples")
        self.log_box = gr.Textbox(label=translate("log", t), lines=14, max_lines=14, elem_id="lt-log")
        self.seen = gr.State({"job_id": None, "state": None})
        self.lora_version = gr.State(0)

    def poll(self, seen: dict, *, gallery_for: Callable[[str], list]) -> list:
        snapshot = self.jobs.snapshot()
        gallery_update = gr.skip()
        changed = (snapshot.get("job_id"), snapshot["state"]) != (seen.get("job_id"), seen.get("state"))
        if changed and snapshot["state"] in ("prepared", "training", "finished"):
            gallery_update = gallery_for(snapshot["project"])
        return [
            render_status(snapshot, self.strings),
            render_progress(snapshot, self.strings),
            "\n".join(reversed(snapshot.get("log", []))),
            loss_frame(snapshot),
            [tuple(s) for s in snapshot.get("samples", [])] or gr.skip(),
            gallery_update,
            {"job_id": snapshot.get("job_id"), "state": snapshot["state"]},
            self.jobs.lora_version,
        ]

    def wire(self, *, gallery, gallery_for: Callable[[str], list]) -> None:
        """Poll once a second; ``gallery`` shows ``gallery_for(project)`` when a run changes state."""
        outputs = [self.status, self.progress, self.log_box, self.loss_plot, self.samples, gallery, self.seen]
        gr.Timer(1.0).tick(
            lambda seen: self.poll(seen, gallery_for=gallery_for),
            inputs=[self.seen],
            outputs=[*outputs, self.lora_version],
            api_visibility="private",
            show_progress="hidden",
        )
