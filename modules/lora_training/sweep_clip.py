"""The CLIP objective of a sweep (``"objective": "subject_similarity"``): a trial trains in segments, one per
report; after each, its newest checkpoint renders the prompt panel and CLIP scores it (:mod:`.evaluate`,
:mod:`.panel_judge`) against the base model, as the subject-similarity rule of :data:`.validation.BEST_RULES`
ranks checkpoints: subject similarity, less how far prompt adherence fell below the base model's minus the
margin. The score is reported to Optuna (higher is better) and the pruner may end the trial there; otherwise
training resumes from that checkpoint, exactly where it stopped."""

from __future__ import annotations

import math

from modules.lora_training.validation import DEFAULT_MARGIN


def clip_score(record: dict, *, base_adherence: float, margin: float = DEFAULT_MARGIN) -> float:
    shortfall = max(0.0, base_adherence - margin - record["prompt_adherence"])
    return record["subject_similarity"] - shortfall


def report_steps(steps: int, reports: int) -> list[int]:
    every = max(1, math.ceil(steps / reports))
    return sorted({*range(every, steps, every), steps})


def _score(config, *, root, place, run_id: str, step: int, should_stop) -> float | None:
    """The CLIP score of the run's checkpoint at ``step``; None when stopped on the way."""
    from modules.lora_training.evaluate import evaluate_run

    evaluation = evaluate_run(
        config.project,
        projects_dir=root,
        models_dir=place.models_dir,
        run_id=run_id,
        device=config.device,
        best_rule="subject_similarity",
        should_stop=should_stop,
    )
    if evaluation is None:
        return None
    record = next(r for r in evaluation.records if r["step"] == step)
    return clip_score(record, base_adherence=evaluation.clip["base_prompt_adherence"])


def train_with_clip_reports(trial, config, *, root, place, watcher, should_stop):
    """Train ``config`` segment by segment, reporting the CLIP score after each; the last TrainResult (a
    ``stopped`` one when the pruner or the user ended the trial)."""
    from modules.lora_training.train import TrainResult, train

    run_id, result = None, None
    for target in report_steps(config.steps, watcher.reports):
        result = train(
            config,
            projects_dir=root,
            models_dir=place.models_dir,
            loras_dir=root.parent / "loras",
            on_event=watcher,
            should_stop=lambda target=target: should_stop() or watcher.step >= target,
            resume=run_id is not None,
            run_id=run_id,
            new_run=run_id is None,
            image_roots=place.image_roots,
        )
        if watcher.run_root is not None:
            run_id = watcher.run_root.name
        if result.status == "failed" or should_stop():
            return result
        score = _score(config, root=root, place=place, run_id=run_id, step=target, should_stop=should_stop)
        if score is None:
            return TrainResult("stopped", target)
        watcher.value = score
        trial.report(score, target)
        if target < config.steps and trial.should_prune():
            watcher.pruned_at = target
            return TrainResult("stopped", target)
    return result
