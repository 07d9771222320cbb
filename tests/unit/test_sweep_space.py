"""A sweep's search space is checked strictly before any trial: every problem is a UserError naming it."""

import json

import pytest

from core.errors import UserError
from modules.lora_training.sweep_space import MAX_TRIALS, parse_space, sweepable


def space(parameters, **top) -> str:
    return json.dumps({"parameters": parameters, **top})


def test_a_good_space_gives_its_parameters_and_defaults():
    parsed = parse_space(
        space(
            {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}, "rank": [4, 8], "optimizer": ["adamw", "lion"]},
            fixed={"batch_size": 1, "base_model": "m"},
            enqueue=[{"rank": 8}],
        ),
        trials=4,
    )
    assert parsed.names() == ("learning_rate", "rank", "optimizer")
    lr, rank, optimizer = parsed.parameters
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-5, 1e-3, True, False)
    assert rank.choices == (4, 8) and optimizer.choices == ("adamw", "lion")
    assert parsed.pruner == {"type": "median", "startup_trials": 2, "warmup_steps": 0, "percentile": 50}
    assert parsed.fixed == {"batch_size": 1, "base_model": "m"} and parsed.enqueue == ({"rank": 8},)
    steps = parse_space(space({"steps": {"low": 10, "high": 50, "step": 10}}), trials=1).parameters[0]
    assert steps.integer and steps.step == 10
    assert "learning_rate" in sweepable() and "project" not in sweepable() and "device" not in sweepable()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (space({"learning_rte": [1e-4]}), "Unknown sweep parameter 'learning_rte'"),
        (space({"project": ["a"]}), "Sweep parameter project: it names files or folders"),
        (space({"reg_images_dir": ["/etc"]}), "Sweep parameter reg_images_dir: it names files or folders"),
        (space({"rank": []}), "empty list of choices"),
        (space({"rank": [4, 4]}), "same choice twice"),
        (space({"rank": [4, None]}), "each choice must be"),
        (space({"rank": [0]}), "rank must be between 1 and 1024"),
        (space({"optimizer": ["adamw", "sgd"]}), "optimizer must be one of"),
        (space({"rank": list(range(1, 40))}), "use at most 32"),
        (space({"learning_rate": {"low": 1e-3, "high": 1e-5}}), "low (0.001) must be below high (1e-05)"),
        (space({"learning_rate": {"low": 1e-3, "high": 1e-3}}), "must be below high"),
        (space({"learning_rate": {"low": 0, "high": 1e-3, "log": True}}), "a log range needs low above 0"),
        (space({"learning_rate": {"low": 1e-5, "high": 20.0}}), "learning_rate must be between 0 and 10"),
        (space({"learning_rate": {"low": 1e-5}}), 'needs both "low" and "high"'),
        (space({"learning_rate": {"low": "1e-5", "high": 1}}), '"low" must be a number'),
        (space({"learning_rate": {"low": 1e-5, "high": 1e-3, "log": "yes"}}), '"log" must be true or false'),
        (space({"learning_rate": {"low": 1e-5, "high": 1e-3, "scale": 2}}), "unknown key(s) scale"),
        (space({"learning_rate": {"low": 1e-5, "high": 1e-3, "step": -1}}), "step must be above 0"),
        (space({"rank": {"low": 2.5, "high": 8}}), "takes whole numbers"),
        (space({"optimizer": {"low": 1, "high": 2}}), "is not a number: give a list"),
        (space({"rank": "8"}), "give a list of choices or"),
        ('{"parameters": {"learning_rate": {"low": NaN, "high": 1e-3}}}', "holds NaN"),
        ('{"parameters": {"learning_rate": {"low": 1e-5, "high": Infinity}}}', "holds Infinity"),
        ('{"parameters": {"rank": [4, -Infinity]}}', "holds -Infinity"),
        ("", "The search space is empty"),
        ("[1, 2]", "must be a JSON object"),
        ('{"parameters": {"rank": [4,}', "not valid JSON (line 1"),
        (space({}), "naming at least one option"),
        (json.dumps({"params": {"rank": [4]}}), "unknown key(s) params"),
        (space({"rank": [4]}, fixed={"steps": -3}), "steps must be between 1 and"),
        (space({"rank": [4]}, fixed={"nonsense": 1}), "unknown option(s) nonsense"),
        (space({"rank": [4]}, fixed={"project": "other"}), '"fixed" cannot set project'),
        (space({"rank": [4]}, trial_steps=0), '"trial_steps" must be a whole number from 1'),
        (space({"rank": [4]}, reports=1.5), '"reports" must be a whole number'),
        (space({"rank": [4]}, pruner={"type": "magic"}), '"pruner" must be an object whose type'),
        (space({"rank": [4]}, pruner={"startup_trials": -1}), '"startup_trials" must be a whole number'),
        (space({"rank": [4]}, sampler={"type": "grid"}), '"sampler" must be an object whose type'),
        (space({"rank": [4]}, objective="loss"), '"objective" must be one of'),
        (space({"rank": [4]}, enqueue=[{"rank": 8}]), "is outside rank in [4]"),
        (space({"rank": [4]}, enqueue=[{"alpha": 8}]), "not a swept parameter"),
        (space({"rank": [4]}, enqueue=[{"rank": 4}] * 3), "3 trials to try first, but the budget is 2"),
        (space({"learning_rate": {"low": 1e-5, "high": 1e-3, "step": 1e-40}}), "step 1e-40 is too small"),
        (space({"rank": {"low": 4, "high": 16}}, enqueue=[{"rank": 4.5}]), "4.5 is outside rank from 4 to 16"),
        (space({"steps": {"low": 10, "high": 50, "step": 10}}, enqueue=[{"steps": 15}]), "15 is outside steps"),
        ("[" * 5000, 'must be a JSON object with "parameters"'),  # nested past Python's stack
        ('{"parameters": {"\ud800": [1]}}', "Unknown sweep parameter"),  # a lone surrogate
    ],
)
def test_bad_spaces_are_refused_with_what_is_wrong(text, says):
    with pytest.raises(UserError) as refused:
        parse_space(text, trials=2)
    assert says in str(refused.value)


@pytest.mark.parametrize("trials", [0, -1, MAX_TRIALS + 1, 2.5, "4", True, float("nan"), None])
def test_the_trial_budget_is_bounded(trials):
    with pytest.raises(UserError, match="number of trials must be a whole number from 1 to"):
        parse_space(space({"rank": [4]}), trials=trials)


def test_a_huge_space_is_refused_before_parsing():
    with pytest.raises(UserError, match="larger than 64 KB"):
        parse_space(space({"rank": [4]}, padding="x" * 70_000), trials=1)
