import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Test modules import mlx at collection time; load the fast BLAS first, as `mlxpt` itself does
# before its own mlx imports (otherwise the whole session runs on the reference BLAS, ~30x slower).
from mlxpt import _blas  # noqa: E402

_blas.activate()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama folder (tests/tiny.py), shared by the whole session (read-only)."""
    import tiny

    return tiny.make_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """24 train / 8 valid rows of the bundled arithmetic chat data."""
    from mlxpt.data import synth

    d = tmp_path_factory.mktemp("data")
    for name, n, seed in (("train", 24, 1), ("valid", 8, 2)):
        rows = synth.make_split(n, seed)
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="session")
def pref_dir(tmp_path_factory):
    """24 train / 8 valid bundled preference pairs without system prompts (tests/tiny.py)."""
    import tiny

    return tiny.write_pref_dir(tmp_path_factory.mktemp("pref"), tiny.pref_rows(32))


@pytest.fixture(scope="session")
def session_mlxpt_home(tmp_path_factory):
    """One MLXPT_HOME for the whole session: the default model is converted into it once (~1 s).

    Set it yourself (monkeypatch.setenv("MLXPT_HOME", str(session_mlxpt_home)))."""
    return tmp_path_factory.mktemp("mlxpt_home")
