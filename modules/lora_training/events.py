"""Events are facts the core emits; the tab, the CLI and the tests each render them their way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"


@dataclass(frozen=True)
class RunChosen:
    """The run a training writes to (a new one, or the one it resumes), before anything is loaded."""

    run_id: str


@dataclass(frozen=True)
class PrepProgress:
    stage: str  # scan | crop | caption
    done: int
    total: int
    item: str = ""


@dataclass(frozen=True)
class PrepFinished:
    project_dir: str
    used: int
    skipped: int


@dataclass(frozen=True)
class StepDone:
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    s_per_step: float


@dataclass(frozen=True)
class Validated:
    """Fixed-noise losses on the held-out images and on as many training images (:mod:`.validation`)."""

    step: int
    validation_loss: float
    training_images_loss: float

    def describe(self) -> str:
        from modules.lora_training.validation import describe_figures

        return describe_figures(
            self.step, validation_loss=self.validation_loss, training_images_loss=self.training_images_loss
        )


@dataclass(frozen=True)
class CheckpointSaved:
    path: str
    step: int


@dataclass(frozen=True)
class SampleSaved:
    path: str
    step: int
    prompt: str


@dataclass(frozen=True)
class Finished:
    lora_path: str
    steps: int


@dataclass(frozen=True)
class Stopped:
    checkpoint_path: str
    step: int


@dataclass(frozen=True)
class Failed:
    message: str


EventSink = Callable[[object], None]


def ignore_events(event: object) -> None:
    """An ``on_event`` that drops everything."""
