"""The prompt panel rendered with a run's model as it stands, and judged with CLIP when a CLIP model is there.

Figures per image set (all cosine similarities of L2-normalised CLIP embeddings):
- ``subject_similarity``: mean similarity of the panel images to the run's training images, minus the
  same for the base model (the base record's figure is 0 by definition; its raw value is in ``clip``);
- ``prompt_adherence``: mean similarity of each panel image to what its prompt asks beyond the subject
  ("on a beach"), raw, so the best-checkpoint rule compares it with the base model's;
- ``aesthetic``: the mean of a LAION-style linear head on the image embeddings, when the CLIP folder has one.
Every image is rendered at the run's sample seed: re-evaluating reproduces the figures.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modules.lora_training.comparison_grid import draw_grid, save_grid
from modules.lora_training.prompt_panel import panel_contexts, panel_prompts, render_panel

MAX_REFERENCE_IMAGES = 16  # training images the subject figure compares with (bounds the CLIP work)


def load_scorer(models_dir: Path, *, name: str = "", device: str = "cpu"):
    """The CLIP scorer of ``models/clip/<name>`` (or the first CLIP folder there); None when there is none."""
    from modules.lora_training.clip_scores import ClipScorer, find_clip_folder

    folder = find_clip_folder(Path(models_dir), name)
    return None if folder is None else ClipScorer.load(folder, device=device)


class PanelJudge:
    def __init__(self, model, *, target, scorer) -> None:
        from PIL import Image

        self.model, self.scorer = model, scorer
        config = target.config
        self.prompts, self.contexts = panel_prompts(target.subject), panel_contexts()
        self.seed, self.steps, self.size = config.sample_seed, config.sample_steps, target.size
        # With LoRA on the text encoders each checkpoint encodes the prompts anew; otherwise once.
        self._reencode = config.train_text_encoder
        self._texts: dict[str, dict] = {}
        self.base: dict[str, float] = {}
        if scorer is not None:
            references = target.training[:MAX_REFERENCE_IMAGES]
            self.references = scorer.image_embeddings([Image.open(item.image_path) for item in references])
            self.context_embeddings = scorer.text_embeddings(self.contexts)

    def _text_for(self, prompt: str) -> dict:
        if self._reencode or prompt not in self._texts:
            self._texts[prompt] = self.model.family.encode_text([prompt])
        return self._texts[prompt]

    def judge(self, *, step: int, should_stop: Callable[[], bool]) -> tuple[list, dict] | None:
        """The panel images and their CLIP figures ({} without CLIP); step 0 is the base model's, the
        reference for the others. None when ``should_stop`` turned true between images."""
        images = render_panel(
            self.model.family,
            prompts=self.prompts,
            text_for=self._text_for,
            seed=self.seed,
            size=self.size,
            steps=self.steps,
            should_stop=should_stop,
        )
        if images is None or self.scorer is None:
            return None if images is None else (images, {})
        figures = self.raw_figures(images)
        if step == 0:
            self.base = dict(figures)
        figures["subject_similarity"] -= self.base.get("subject_similarity", figures["subject_similarity"])
        return images, figures

    def raw_figures(self, images: list) -> dict[str, float]:
        from modules.lora_training.clip_scores import prompt_adherence, subject_similarity

        embeddings = self.scorer.image_embeddings(images)
        figures = {
            "subject_similarity": subject_similarity(embeddings, self.references),
            "prompt_adherence": prompt_adherence(embeddings, self.context_embeddings),
        }
        aesthetic = self.scorer.aesthetic(images)
        if aesthetic is not None:
            figures["aesthetic"] = float(aesthetic.mean())
        return figures

    def describe(self) -> dict:
        """What ``evaluation.json`` records of the panel: prompts, seed, steps and the CLIP model's base figures."""
        described = {"prompts": self.prompts, "contexts": self.contexts, "seed": self.seed, "steps": self.steps}
        if self.scorer is None:
            return {**described, "model": None}
        base = {f"base_{key}": value for key, value in self.base.items()}
        return {**described, "model": self.scorer.name, **base}

    def save_grid(self, rows: list[tuple[str, list]], *, path: Path, title: str) -> str:
        """The grid of ``rows`` × the panel's prompts, written to ``path``; its file name."""
        grid = draw_grid(rows, columns=self.prompts, title=f"{title} · seed {self.seed}")
        description = {"rows": [label for label, _ in rows], "prompts": self.prompts, "seed": self.seed}
        return save_grid(grid, path, description=description).name


def describe_clip_figures(record: dict) -> str:
    """The log's line: "CLIP at step 40: subject +0.0123 over the base model, prompt adherence 0.2100"."""
    line = (
        f"CLIP at step {record['step']}: subject {record['subject_similarity']:+.4f} over the base model, "
        f"prompt adherence {record['prompt_adherence']:.4f}"
    )
    return line + (f", aesthetic {record['aesthetic']:.3f}" if record.get("aesthetic") is not None else "")
