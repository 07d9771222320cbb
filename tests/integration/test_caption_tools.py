"""Caption tools on a prepared project: every action and its undo, the source folder untouched, the CLI."""

import hashlib

import pytest

from core.errors import UserError
from modules.lora_training.caption_tools import HISTORY_LIMIT, read_captions, run_caption_tool
from modules.lora_training.project import ProjectPaths
from tests.conftest import write_config

CAPTIONS = ["ohwx, red shirt, smiling", "ohwx, red shirt, outdoors", "ohwx, blue shirt", "ohwx, smiling, outdoors"]


@pytest.fixture
def captioned(project):
    projects, name = project
    paths = ProjectPaths.for_project(projects, name)
    for image, caption in zip(sorted(read_captions(paths)), CAPTIONS, strict=True):
        (paths.images / image).with_suffix(".txt").write_text(caption + "\n")
    return paths


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_action_and_its_undo(captioned):
    paths = captioned
    source = _digest(paths.source) if paths.source.is_dir() else {}
    before = read_captions(paths)
    table = run_caption_tool(paths, action="frequencies").frequencies
    assert table[:3] == [("ohwx", 4), ("outdoors", 2), ("red shirt", 2)]

    steps = [
        ("replace", "red shirt", "green shirt", 2),
        ("add", "sunny", "", 4),
        ("remove", "smiling", "", 2),
        ("prefix", "", "photo", 4),
        ("suffix", "", "film grain", 4),
    ]
    states = [before]
    for action, tag, replacement, changed in steps:
        result = run_caption_tool(paths, action=action, tag=tag, replacement=replacement)
        assert result.changed == changed, (action, result.message)
        states.append(read_captions(paths))
    final = sorted(states[-1].values())
    assert final[0] == "ohwx, photo, blue shirt, sunny, film grain"
    assert dict(run_caption_tool(paths, action="frequencies").frequencies)["green shirt"] == 2
    found = run_caption_tool(paths, action="search", tag="GREEN").matches
    assert len(found) == 2 and all("green shirt" in caption for _, caption in found), "case-insensitive"

    for expected in reversed(states[:-1]):
        assert "restored" in run_caption_tool(paths, action="undo").message
        assert read_captions(paths) == expected, "each undo goes back one change"
    assert run_caption_tool(paths, action="undo").message == "Nothing to undo."
    assert (_digest(paths.source) if paths.source.is_dir() else {}) == source, "the source folder is never touched"


def test_bad_requests_are_refused_and_change_nothing(captioned):
    paths = captioned
    before = read_captions(paths)
    for action, tag, replacement, message in (
        ("remove", "ohwx", "", "is the trigger word"),
        ("replace", "ohwx", "cat", "is the trigger word"),
        ("add", "a, b", "", "one tag, without commas"),
        ("add", "", "", "1 to 200 characters"),
        ("replace", "smiling", "x\ny", "1 to 200 characters"),
        ("suffix", "", "z" * 501, "1 to 500 characters"),
        ("add", 5, "", "tag must be text"),
        ("drop table", "", "", "action must be one of"),
    ):
        with pytest.raises(UserError, match=message):
            run_caption_tool(paths, action=action, tag=tag, replacement=replacement)
    assert read_captions(paths) == before
    assert not (paths.root / "caption_history").exists()


def test_history_is_bounded(captioned):
    for number in range(HISTORY_LIMIT + 3):
        run_caption_tool(captioned, action="add", tag=f"tag{number}")
    assert len(list((captioned.root / "caption_history").glob("*.json"))) == HISTORY_LIMIT


def test_the_cli(captioned, models_dir, tmp_path, capsys):
    from modules.lora_training.cli import main

    config = write_config(tmp_path, models_dir, LORA_PROJECTS_DIR=str(captioned.root.parent))
    base = ["--app-config", str(config), "captions", "--project", captioned.name]
    assert main(base) == 0 and "     4  ohwx" in capsys.readouterr().out
    assert main([*base, "--replace", "red shirt", "green shirt"]) == 0
    assert "replace: 2 caption(s) changed." in capsys.readouterr().out
    assert main([*base, "--search", "green"]) == 0 and "2 caption(s) contain 'green'." in capsys.readouterr().out
    assert main([*base, "--undo"]) == 0 and "Undid replace: 2 caption(s) restored." in capsys.readouterr().out
    assert main([*base, "--remove", "ohwx"]) == 2 and "is the trigger word" in capsys.readouterr().err


def test_odd_history_files_are_ignored_or_refused_before_anything_is_written(captioned):
    """Review 9 #10: "².json" (digits to str.isdigit, not to int) broke every change; a snapshot that is not
    what the app writes broke Undo with a raw KeyError after restoring nothing and deleting it."""
    paths = captioned
    run_caption_tool(paths, action="add", tag="red")
    history = paths.root / "caption_history"
    (history / "\u00b2.json").write_text("{}")
    assert run_caption_tool(paths, action="add", tag="blue").changed == 4
    assert run_caption_tool(paths, action="undo").changed == 4
    before = read_captions(paths)
    odd = history / "00009999.json"
    for content in ('{"captions": {"x": 1}}', "[1]", '{"action": "add"}', "{oops"):
        odd.write_text(content)
        with pytest.raises(UserError, match="Caption history file"):
            run_caption_tool(paths, action="undo")
        assert odd.is_file() and read_captions(paths) == before
