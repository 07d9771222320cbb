"""The loss plot's points: the training loss and, once measured, the validation figures as their own series."""

from modules.lora_training.status_view import loss_frame

STRINGS = {"series_training": "training", "series_held_out": "held-out", "series_training_images": "trained on"}


def test_the_plot_has_one_series_per_figure():
    snapshot = {"losses": [(1, 0.5), (2, 0.4)], "validation": [(0, 0.9, 0.8), (2, 0.7, 0.3)]}
    frame = loss_frame(snapshot, STRINGS)
    assert list(frame.columns) == ["step", "loss", "series"]
    by_series = {name: list(zip(part["step"], part["loss"], strict=True)) for name, part in frame.groupby("series")}
    assert by_series == {
        "training": [(1, 0.5), (2, 0.4)],
        "held-out": [(0, 0.9), (2, 0.7)],
        "trained on": [(0, 0.8), (2, 0.3)],
    }


def test_an_empty_job_plots_nothing():
    frame = loss_frame({"state": "idle"}, STRINGS)
    assert frame.empty and list(frame.columns) == ["step", "loss", "series"]


def test_an_evaluation_shows_checkpoints_measured():
    from modules.lora_training.status_view import render_progress

    strings = {
        "progress_evaluation": "checkpoint {step}/{total} · {s_per_step:.1f} s each · ETA {eta}",
        "progress_done_evaluation": "checkpoint {step}/{total}",
    }
    snapshot = {"kind": "evaluate", "running": True, "step": 1, "total_steps": 3, "s_per_step": 20.0}
    assert render_progress({**snapshot, "eta_seconds": 40}, strings).endswith(
        "<div>checkpoint 1/3 · 20.0 s each · ETA 0m40s</div>"
    )
    assert render_progress({**snapshot, "running": False, "step": 3}, strings).endswith("<div>checkpoint 3/3</div>")
