"""`mlxpt serve`: an OpenAI-compatible server for the base model and the runs' adapters, with
mlxpt's test-time strategies per request (docs/serve.md).

- schema.py: request bodies checked into a `Request` (or an OpenAI-style `ApiError`);
- catalog.py: the servable names (base, runs, checkpoints) and the memory-bounded model cache;
- engine.py: the one generation thread (mlx-lm's continuous batch; strategies run whole);
- app.py: the standard library's threading HTTP server, routes, JSON and server-sent events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxpt.serve.schema import Limits


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default; a public bind needs an API key
    port: int = 8080
    model: str = "smollm2-135m"  # the base model served (and the base of runs without a config)
    runs_dir: str = "runs"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    cache_bytes: int = 4 << 30  # loaded models kept, least recently used out first
    batch_size: int = 32  # rows decoded together in the continuous batch
    scorers: tuple[str, ...] = ()  # scorer specs requests may name (code-loading ones only from here)
    trust_remote_code: bool = False


def make_server(cfg: ServeConfig):
    """A bound server (not yet serving) with its engine thread started; `server.url` says where."""
    from mlxpt.serve.app import make_server as _make
    from mlxpt.serve.catalog import Catalog, ModelCache
    from mlxpt.serve.engine import Engine

    engine = Engine(Catalog(cfg.model, cfg.runs_dir), ModelCache(cfg.cache_bytes, cfg.trust_remote_code), cfg.limits,
                    cfg.batch_size)  # fmt: skip
    try:
        return _make(cfg.host, cfg.port, engine, cfg.limits, cfg.api_key, cfg.scorers)
    except BaseException:
        engine.stop()
        raise
