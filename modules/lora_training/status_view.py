"""The training status column: status line, progress bar, loss plot, samples and log, polled each second."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr
import pandas as pd

from core.i18n import shown_message, text_of, translate
from core.page_texts import page_texts_of

_STAMP = re.compile(r"(\d\d:\d\d:\d\d  )(.*)", re.DOTALL)


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
    stage = snapshot.get("prep_stage", "")
    if state in ("starting", "training") and not snapshot.get("total_steps"):
        # Before the first step: loading the model, caching latents and text embeddings.
        key = "status_phase" if snapshot.get("prep_total") else "status_phase_unsized"
        phase = translate(f"stage_{stage}", strings) if stage else translate("stage_starting", strings)
        return translate(key, strings, project=snapshot["project"], phase=phase, **_counts(snapshot))
    values = {
        "project": snapshot["project"],
        "stage": translate(f"stage_{stage}", strings) if stage else "",
        "done": snapshot.get("prep_done", 0),
        "total": snapshot.get("prep_total", 0) if state == "preparing" else snapshot.get("total_steps", 0),
        "step": snapshot.get("step", 0),
        "message": shown_message(snapshot.get("message", ""), strings),
    }
    key = {"starting": "status_preparing"}.get(state, f"status_{state}")
    return translate(key, strings, **values)


def shown_log(lines: list[str], strings) -> str:
    """The job's log, newest first, each line in the page's language (the time stamp kept as it is)."""
    shown = []
    for line in reversed(lines):
        stamped = _STAMP.fullmatch(line)
        if stamped:
            shown.append(stamped.group(1) + shown_message(stamped.group(2), strings))
        else:
            shown.append(shown_message(line, strings))
    return "\n".join(shown)


def _counts(snapshot: dict) -> dict:
    return {"done": snapshot.get("prep_done", 0), "total": snapshot.get("prep_total", 0)}


def render_progress(snapshot: dict, strings: dict) -> str:
    total = snapshot.get("total_steps") or 0
    if not total:
        return ""
    step = snapshot.get("step", 0)
    # An evaluation counts measured checkpoints, not training steps.
    suffix = "_evaluation" if snapshot.get("kind") == "evaluate" else ""
    if not snapshot.get("running"):  # a stopped or finished run has no time left to show
        text = translate(f"progress_done{suffix}", strings, step=step, total=total)
        return f'<progress value="{step}" max="{total}" style="width:100%"></progress><div>{text}</div>'
    text = translate(
        f"progress{suffix}",
        strings,
        step=step,
        total=total,
        s_per_step=snapshot.get("s_per_step") or 0.0,
        eta=format_eta(snapshot.get("eta_seconds")),
    )
    return f'<progress value="{step}" max="{total}" style="width:100%"></progress><div>{text}</div>'


def loss_frame(snapshot: dict, strings: dict) -> pd.DataFrame:
    """The plot's points: the training loss per step, and the validation figures as two more series."""
    names = [translate(key, strings) for key in ("series_training", "series_held_out", "series_training_images")]
    rows = [(step, loss, names[0]) for step, loss in snapshot.get("losses", [])]
    for step, held_out, trained in snapshot.get("validation", []):
        rows += [(step, held_out, names[1]), (step, trained, names[2])]
    return series_frame(rows, value="loss")


def start_job(start: Callable[[], dict], strings: dict) -> None:
    """Run ``start()`` (a job's start) from a button: "Job N started", or the refusal shown on the page."""
    from core.errors import UserError, shown_to_user

    try:
        job = start()
    except UserError as exc:
        raise shown_to_user(exc, strings) from exc
    if job.get("state") == "queued":
        gr.Info(translate("queued_toast", strings, queue_id=job["queue_id"], position=job["position"]))
    else:
        gr.Info(translate("started", strings, job_id=job["job_id"]))


def lines_caption(frame: pd.DataFrame, strings: dict) -> str:
    """ "Lines: training, held-out images": the names of a plot frame's lines."""
    names = list(dict.fromkeys(frame["series"]))
    return translate("plot_lines", strings, names=", ".join(names)) if names else ""


def series_frame(rows: list[tuple], *, value: str) -> pd.DataFrame:
    """(step, value, series name) rows as a line plot's frame. The types are explicit: the page draws with
    the types of the plot's first value, and an empty frame would type ``series`` as a number (a colour
    gradient, no lines at all) instead of the names of the lines."""
    frame = pd.DataFrame(rows, columns=["step", value, "series"])
    return frame.astype({"step": "float64", value: "float64", "series": "str"})


@dataclass(frozen=True)
class PageHooks:
    """What the rest of the page shows of a job: ``on_change(snapshot, opened=)`` returns updates for
    ``outputs`` when the job's state changes, and once when a page is opened or reloaded."""

    outputs: list
    on_change: Callable[..., dict]
    plots: list = field(default_factory=list)  # line plots among ``outputs`` (see StatusView.caption_plots)
    tick: Callable[[], dict] | None = None  # updates for some of ``outputs`` at every poll (the queue table)
    # (snapshot, seen) -> (updates for some of ``outputs``, what to keep in ``seen``): a view that follows the job
    # and updates the page only when what it shows changed (the sweep's trials table)
    follow: Callable[[dict, dict], tuple[dict, dict]] | None = None


class StatusView:
    """Widgets showing ``jobs.snapshot()``; a new run state refreshes the prepared-images gallery and
    a newly saved LoRA bumps ``lora_version`` (a ``gr.State`` other tabs can listen to)."""

    def __init__(self, *, jobs, strings: dict) -> None:
        self.jobs = jobs
        self.strings = strings

    def build(self) -> None:
        t = self.strings
        self.status = page_texts_of(t).markdown(text_of(t, "status_idle"), elem_id="lt-status")
        self.progress = gr.HTML(elem_id="lt-progress")
        self.loss_plot = gr.LinePlot(
            series_frame([], value="loss"),
            x="step",
            y="loss",
            color="series",
            label=text_of(t, "loss"),
            x_title=text_of(t, "plot_step"),
            y_title=text_of(t, "loss"),
            elem_id="lt-loss",
        )
        self.samples = gr.Gallery(label=text_of(t, "samples"), columns=4, height=200, elem_id="lt-samples")
        self.log_box = gr.Textbox(label=text_of(t, "log"), lines=14, max_lines=14, elem_id="lt-log")
        self.seen = gr.State({"job_id": None, "state": None, "loaded": False})
        self.lora_version = gr.State(0)

    def poll(self, seen: dict, *, page: PageHooks) -> dict:
        """The widgets' new values; when the job's state changed (or the page was just opened), also what
        ``page`` says (the prepared gallery, the form of the job, the buttons, the banner)."""
        snapshot = self.jobs.snapshot()
        updates = {
            self.status: render_status(snapshot, self.strings),
            self.progress: render_progress(snapshot, self.strings),
            self.log_box: shown_log(snapshot.get("log", []), self.strings),
            self.loss_plot: loss_frame(snapshot, self.strings),
            self.seen: {"job_id": snapshot.get("job_id"), "state": snapshot["state"], "loaded": True},
            self.lora_version: self.jobs.lora_version,
        }
        if snapshot.get("samples"):
            updates[self.samples] = [
                (path, shown_message(caption, self.strings)) for path, caption in snapshot["samples"]
            ]
        if page.tick is not None:
            updates |= page.tick()
        followed: dict = {}
        if page.follow is not None:
            changes, followed = page.follow(snapshot, seen)
            updates |= changes
        opened = not seen.get("loaded")
        if opened or (snapshot.get("job_id"), snapshot["state"]) != (seen.get("job_id"), seen.get("state")):
            updates |= page.on_change(snapshot, opened=opened)
        captions = self.caption_plots(updates, seen=seen, plots=[self.loss_plot, *page.plots])
        updates[self.seen] = {**updates[self.seen], **captions, **followed}
        return updates

    def caption_plots(self, updates: dict, *, seen: dict, plots: list) -> dict:
        """Caption each plot with the names of the lines it was sent on the previous tick, one tick after.

        A Gradio line plot takes its colour scale from its lines only when it is redrawn, which a caption
        change does; redrawn in the same update as new lines, it misses them (they are drawn without a
        colour: invisible). So the caption naming the lines follows their frame by a tick."""
        sent, shown = dict(seen.get("sent", {})), dict(seen.get("shown", {}))
        for plot in plots:
            key = plot.elem_id
            frame = updates.get(plot)
            if sent.get(key) != shown.get(key):
                changes = {"caption": sent[key]} if frame is None else {"caption": sent[key], "value": frame}
                updates[plot] = gr.update(**changes)
                shown[key] = sent[key]
            if isinstance(frame, pd.DataFrame):
                sent[key] = lines_caption(frame, self.strings)
        return {"sent": sent, "shown": shown}

    def wire(self, *, page: PageHooks) -> None:
        """Poll once a second (the first tick of a page also restores it from the server's state)."""
        outputs = [self.status, self.progress, self.log_box, self.loss_plot, self.samples, self.seen]
        gr.Timer(1.0).tick(
            lambda seen: self.poll(seen, page=page),
            inputs=[self.seen],
            outputs=[*outputs, self.lora_version, *page.outputs],
            api_visibility="private",
            show_progress="hidden",
        )
