"""The layers contract (tests/layers.py, docs/ARCHITECTURE.md) holds on this tree, and it would
catch an upward import, a sibling import or a circle if one were added."""

from __future__ import annotations

import shutil
from pathlib import Path

import layers

ROOT = Path(__file__).resolve().parent.parent


def _copy(tmp_path: Path) -> Path:
    for pkg in ("mlxpt", "app"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n" + line + "\n", encoding="utf-8")


def test_main_keeps_the_layers():
    assert layers.violations(ROOT) == []


def test_an_upward_import_fails(tmp_path):
    root = _copy(tmp_path)
    # the compute layer reaching up into a training method, hidden inside a function
    _append(root / "mlxpt/backends/base.py", "def _x():\n    from mlxpt.train.grpo import run_grpo\n")
    problems = layers.violations(root)
    assert any("mlxpt.backends.base imports mlxpt.train.grpo" in p and "higher" in p for p in problems), problems


def test_a_sibling_import_fails(tmp_path):
    root = _copy(tmp_path)
    _append(root / "mlxpt/data/batching.py", "import mlxpt.models.loader")
    problems = layers.violations(root)
    assert any("independent siblings" in p for p in problems), problems


def test_a_circle_inside_a_layer_fails(tmp_path):
    root = _copy(tmp_path)
    # train.loop is imported by train.runner; the reverse closes a circle
    _append(root / "mlxpt/train/loop.py", "from mlxpt.train import runner")
    problems = layers.violations(root)
    assert any(p.startswith("import circle") and "mlxpt.train.loop" in p for p in problems), problems


def test_a_module_outside_the_contract_is_named(tmp_path):
    root = _copy(tmp_path)
    (root / "mlxpt/extra.py").write_text("import os\n", encoding="utf-8")
    assert any("mlxpt.extra: not in any layer" in p for p in layers.violations(root))
