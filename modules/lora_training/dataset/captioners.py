"""Captioners behind one small interface: ``caption(images, should_stop=...) -> list[str]`` and ``close()``.

The ``captioner`` setting names one (``florence2``, ``tags``: the WD14 tagger of ``wd14_tagger.py``) or two
(``florence2+tags``: the sentence, then the tags; ``caption_run.py`` runs them and combines the outputs).

Florence-2 uses transformers' native classes (no remote code). It loads from a local
folder (``models/captioners/...``) or, when online, a hub id; runs batched, in fp16 on
a GPU; and frees its memory on ``close()``. ``should_stop`` is checked at every generated
token (a batch takes seconds on a CPU): once it is true, ``caption`` returns early with
fewer captions than images, and the caller discards them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from core.errors import UserError

FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_FLORENCE_MODEL = "florence-community/Florence-2-base"
CAPTIONERS = ("florence2", "none", "tags", "florence2+tags")


def captioner_members(name: str) -> tuple[str, ...]:
    """The captioners a ``captioner`` setting runs, in caption order: ``"florence2+tags"`` → both."""
    if name not in CAPTIONERS:
        raise UserError(f"Captioner {name!r} is not one of {', '.join(CAPTIONERS)}.")
    return () if name == "none" else tuple(name.split("+"))


class Captioner(Protocol):
    name: str

    def caption(self, images: list, *, should_stop: Callable[[], bool] = ...) -> list[str]: ...

    def close(self) -> None: ...


def _never() -> bool:
    return False


def _stop_criteria(should_stop: Callable[[], bool]):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopFlag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopFlag()])


class NoCaptioner:
    """Captions come from the .txt files beside the images (plus the trigger word)."""

    name = "none"

    def caption(self, images: list, *, should_stop: Callable[[], bool] = _never) -> list[str]:
        return ["" for _ in images]

    def close(self) -> None:
        pass


class Florence2Captioner:
    name = "florence2"

    def __init__(
        self,
        model: str | Path,
        *,
        task: str = "<DETAILED_CAPTION>",
        device: str | None = None,
        batch_size: int = 4,
        max_new_tokens: int = 96,
        num_beams: int = 3,
    ) -> None:
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        if task not in FLORENCE_TASKS:
            raise UserError(f"Caption task {task!r} is not one of {', '.join(FLORENCE_TASKS)}.")
        self.task = task
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(str(model))
            self.model = Florence2ForConditionalGeneration.from_pretrained(str(model), dtype=self.dtype)
        except OSError as exc:
            raise UserError(
                f"Florence-2 captioner not found at {model!r}. Put a converted Florence-2 checkpoint "
                "(e.g. florence-community/Florence-2-base) in models/captioners/, or choose captioner 'none'."
            ) from exc
        self.model.to(self.device).eval()

    def caption(self, images: list, *, should_stop: Callable[[], bool] = _never) -> list[str]:
        import torch

        captions: list[str] = []
        stopping = _stop_criteria(should_stop)
        for start in range(0, len(images), self.batch_size):
            if should_stop():
                break
            batch = images[start : start + self.batch_size]
            inputs = self.processor(text=[self.task] * len(batch), images=batch, return_tensors="pt")
            inputs = {
                k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()
            }
            with torch.inference_mode():
                generated = self.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    num_beams=self.num_beams,
                    do_sample=False,
                    stopping_criteria=stopping,
                )
            if should_stop():
                break
            texts = self.processor.batch_decode(generated, skip_special_tokens=False)
            for text, image in zip(texts, batch, strict=True):
                parsed = self.processor.post_process_generation(text, task=self.task, image_size=image.size)
                captions.append(str(parsed.get(self.task, "")).strip())
        return captions

    def close(self) -> None:
        import torch

        self.model = None
        self.processor = None
        # Only GPU memory needs freeing at once (training comes next); on the CPU a full collection
        # takes most of a second on a busy machine, which a Stop should not wait for.
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()


def resolve_florence_model(value: str | None, models_dir: Path) -> str:
    """A local folder if one matches, else the value as a hub id (used only when online)."""
    candidates = []
    if value:
        candidates += [Path(value), Path(models_dir) / "captioners" / value]
    else:
        candidates.append(Path(models_dir) / "captioners" / DEFAULT_FLORENCE_MODEL.split("/")[-1])
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    return value or DEFAULT_FLORENCE_MODEL
