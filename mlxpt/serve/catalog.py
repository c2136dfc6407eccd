"""What a server can serve: the base model and the adapters of the runs folder, by name, and a
memory-bounded LRU cache of the loaded (model, tokenizer) pairs.

Names: the base's name (`--model`, or its folder name), `RUN` (a finished run's adapter) and
`RUN:step-N` (one of its checkpoints). A requested name is looked up in the listing of the runs
folder (`runs.listing`); it is never joined onto a path, so `../x` or `/etc` cannot reach a file.
Names with path characters are refused before the lookup, with their own error.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mlxpt.serve.schema import ApiError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*(:step-[0-9]+)?")


@dataclass(frozen=True)
class Entry:
    name: str
    base: str  # the model reference the weights load from
    adapter: Path | None  # run or checkpoint folder; None for the base
    quantize: str = "auto"
    created: int = 0


def _checked(name: str) -> str:
    if ".." in name or "/" in name or "\\" in name or "\x00" in name or not _NAME_RE.fullmatch(name):
        raise ApiError(
            400, "E905", f"model name {name[:80]!r} is not a run name (path characters are refused)", "model",
            "use a name from GET /v1/models",
        )  # fmt: skip
    return name


class Catalog:
    """The servable names: the base plus every finished run (and every run's checkpoints)."""

    def __init__(self, base: str, runs_dir: str | Path):
        self.base = base
        self.base_name = Path(base).name if ("/" in base or Path(base).exists()) else base
        self.runs_dir = Path(runs_dir)

    def entries(self) -> dict[str, Entry]:
        from mlxpt.fuse import base_model_of
        from mlxpt.models.adapters import ADAPTER_FILE
        from mlxpt.runs.listing import list_runs
        from mlxpt.runs.store import list_checkpoints

        out = {self.base_name: Entry(self.base_name, self.base, None)}
        for info in reversed(list_runs(self.runs_dir)):  # oldest first, so newer names win a clash
            section = base_model_of(info.path) or {}
            base = section.get("model") or self.base
            quantize = str(section.get("quantize", "auto"))
            created = int(info.started.timestamp()) if info.started else 0
            if info.status == "finished" and (info.path / ADAPTER_FILE).is_file():
                out[info.name] = Entry(info.name, base, info.path, quantize, created)
            for ckpt in list_checkpoints(info.path):
                name = f"{info.name}:{ckpt.name}"
                out[name] = Entry(name, base, ckpt, quantize, created)
        return out

    def find(self, name: str) -> Entry:
        if name in (self.base, self.base_name):
            return Entry(self.base_name, self.base, None)
        found = self.entries().get(_checked(name))
        if found is None:
            raise ApiError(404, "E904", f"no model named {name!r}", "model", "GET /v1/models lists the names")
        return found


def model_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


class ModelCache:
    """Loaded models by name, least recently used first out once their bytes pass `max_bytes`
    (the newest always stays, however big)."""

    def __init__(self, max_bytes: int, trust_remote_code: bool = False):
        self.max_bytes, self.trust_remote_code = max_bytes, trust_remote_code
        self._items: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, entry: Entry):
        """(model, tokenizer) of `entry`, loaded on first use, and again when its adapter file
        changed on disk (a resumed run finished again: its name was once served with the old
        weights, without a word). ModelError: E500 answer."""
        from mlxpt.models.adapters import adapter_stamp

        stamp = adapter_stamp(entry.adapter)
        with self._lock:
            if entry.name in self._items and self._items[entry.name][3] == stamp:
                self._items.move_to_end(entry.name)
                return self._items[entry.name][:2]
        from mlxpt.models.loader import load

        model, tok = load(
            entry.base, adapter=str(entry.adapter) if entry.adapter else None, quantize=entry.quantize,
            trust_remote_code=self.trust_remote_code,
        )  # fmt: skip
        with self._lock:
            self._items.pop(entry.name, None)
            self._items[entry.name] = (model, tok, model_bytes(model), stamp)
            while len(self._items) > 1 and sum(v[2] for v in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)
        return model, tok

    def names(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def loaded(self) -> list[tuple[str, object]]:
        """(name, model) of every model held: a name loaded again is another model."""
        with self._lock:
            return [(name, v[0]) for name, v in self._items.items()]
