import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def session_mlxpt_home(tmp_path_factory):
    """One MLXPT_HOME for the whole session: the default model is converted into it once (~1 s).

    Set it yourself (monkeypatch.setenv("MLXPT_HOME", str(session_mlxpt_home)))."""
    return tmp_path_factory.mktemp("mlxpt_home")
