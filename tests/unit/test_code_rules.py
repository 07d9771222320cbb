"""House rules that reading code alone would let slip: short functions, and a README layout that matches the tree."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = ("app.py", "core", "families", "model_formats", "modules", "bench", "scripts")
MAX_FUNCTION_LINES = 60
NOT_IN_THE_TREE = {"test-artifacts", "__pycache__"}  # written by runs, ignored by git


def _python_files() -> list[Path]:
    files = []
    for name in CODE:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert len(_python_files()) > 50
    assert not long, "split these functions:\n" + "\n".join(long)


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n+```\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)
    assert match, "README has a Layout section with the tree in a code block"
    return match.group(1)


def _folders() -> list[str]:
    """Top-level folders (hidden ones only for CI) and the packages inside the code folders."""
    top = [p for p in ROOT.iterdir() if p.is_dir() and p.name not in NOT_IN_THE_TREE]
    top = [p for p in top if not p.name.startswith(".") or p.name == ".ci"]
    packages = [
        p
        for name in ("core", "families", "model_formats", "modules", "modules/lora_training")
        for p in (ROOT / name).iterdir()
        if p.is_dir() and p.name not in NOT_IN_THE_TREE and any(p.glob("*.py"))
    ]
    return sorted({p.name for p in top + packages} - {".venv"})


def test_the_readme_layout_names_every_folder_of_the_tree():
    layout = _layout_block()
    missing = [name for name in _folders() if f"{name}/" not in layout]
    assert not missing, f"README's Layout section does not describe: {missing}"
