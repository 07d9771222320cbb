"""Review 9 #17: a NaN figure never wins "best checkpoint", and a crafted evaluation.json reads as what it
can (raw TypeError before, for Save best, Evaluate, the grid and keep-N pruning)."""

import json

import pytest

from modules.lora_training.validation import Evaluation

NAN = float("nan")


@pytest.mark.parametrize("bad", [NAN, float("inf"), -float("inf"), "x", None])
def test_a_non_finite_held_out_loss_is_never_best(bad):
    evaluation = Evaluation(
        records=[
            {"step": 10, "validation_loss": bad, "checkpoint": "a"},
            {"step": 20, "validation_loss": 0.1, "checkpoint": "b"},
        ]
    )
    assert evaluation.best()["step"] == 20


def test_a_nan_subject_similarity_is_never_best():
    records = [
        {"step": 10, "subject_similarity": NAN, "prompt_adherence": 0.5, "checkpoint": "a"},
        {"step": 20, "subject_similarity": 0.3, "prompt_adherence": 0.5, "checkpoint": "b"},
        {"step": 30, "subject_similarity": 0.9, "prompt_adherence": NAN, "checkpoint": "c"},
    ]
    assert Evaluation(records=records, rule="subject_similarity").best()["step"] == 20


def test_a_nan_figure_is_recorded_as_none(tmp_path):
    evaluation = Evaluation()
    evaluation.add({"step": 10, "validation_loss": NAN, "checkpoint": "a"})
    evaluation.write(tmp_path / "evaluation.json")
    assert json.loads((tmp_path / "evaluation.json").read_text())["records"][0]["validation_loss"] is None


def test_crafted_records_are_left_out_when_read(tmp_path):
    path = tmp_path / "evaluation.json"
    records = [
        {"step": "x"},
        {"step": True},
        [1],
        {"step": -1},
        {"step": 10, "validation_loss": NAN, "checkpoint": "a"},
    ]
    records.append({"step": 20, "validation_loss": 0.5, "checkpoint": "b"})
    path.write_text(json.dumps({"records": records, "clip": {"base_prompt_adherence": "x"}}))
    evaluation = Evaluation.read(path, up_to_step=100)
    assert [r["step"] for r in evaluation.records] == [10, 20] and evaluation.best()["step"] == 20
    path.write_text(json.dumps({"records": 5}))
    assert Evaluation.read(path, up_to_step=100).records == []
