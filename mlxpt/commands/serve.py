"""`mlxpt serve`: the OpenAI-compatible server (mlxpt/serve/, docs/serve.md) on loopback."""

from __future__ import annotations

import ipaddress
import sys

from mlxpt.errors import ConfigError, ResourceError, SecurityError

DEFAULT_MODEL = "smollm2-135m"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server for the base model and the runs' adapters")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --api-key)")
    p.add_argument("--port", type=int, default=8080, help="port (0: a free one)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model served (default {DEFAULT_MODEL})")
    p.add_argument("--runs-dir", default="runs", help="runs folder whose finished runs and checkpoints are served")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request")
    p.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES", help="largest request body")
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--max-n", type=int, default=16, help="most choices (or strategy samples) per request")
    p.add_argument("--max-streams", type=int, default=32, help="requests generated at once (more get 429)")
    p.add_argument("--batch-size", type=int, default=32, help="rows decoded together in the continuous batch")
    p.add_argument("--cache-gb", type=float, default=4.0, help="memory for loaded models (LRU; the newest stays)")
    p.add_argument(
        "--scorer", action="append", default=[], metavar="SPEC",
        help="a scorer requests may name (repeatable); verifier:file.py:fn, reward:file.py:fn and rm:RUN only this way",
    )  # fmt: skip
    p.add_argument("--no-preload", action="store_true", help="load the base model at its first request, not at start")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow model folders that run their own Python code"
    )
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args) -> None:
    """Flags checked before any model loads (E915-E917)."""
    from pathlib import Path

    from mlxpt.decode.scorers import check_spec

    if not _is_loopback(args.host) and not args.api_key:
        raise SecurityError(
            "E915", f"refusing to serve on {args.host} without an API key", "--host",
            "add --api-key KEY, or keep the default --host 127.0.0.1",
        )  # fmt: skip
    if not 0 <= args.port <= 65535:
        raise ConfigError("E916", f"port={args.port} is out of range", "--port", "use 0..65535 (0: a free port)")
    for flag in ("max_body", "max_tokens", "max_n", "max_streams", "batch_size"):
        if getattr(args, flag) < 1:
            name = "--" + flag.replace("_", "-")
            raise ConfigError("E916", f"{name}={getattr(args, flag)} is out of range", name, "use a whole number >= 1")
    if not args.cache_gb > 0:
        raise ConfigError("E916", f"--cache-gb={args.cache_gb} is out of range", "--cache-gb", "use a positive size")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("E916", "the API key is empty", "--api-key", "give a non-empty key")
    runs = Path(args.runs_dir)
    if runs.exists() and not runs.is_dir():
        raise ConfigError("E917", "the runs folder is a file", args.runs_dir, "pass a folder to --runs-dir")
    for spec in args.scorer:
        check_spec(spec)


def config_of(args):
    from mlxpt.serve import ServeConfig
    from mlxpt.serve.schema import Limits

    limits = Limits(args.max_body, args.max_tokens, args.max_n, args.max_streams)
    return ServeConfig(
        args.host, args.port, args.model, args.runs_dir, args.api_key, limits, int(args.cache_gb * (1 << 30)),
        args.batch_size, tuple(args.scorer), args.trust_remote_code,
    )  # fmt: skip


def run(args) -> int:
    from mlxpt.serve import make_server

    check_args(args)
    try:
        server = make_server(config_of(args))
    except OSError as e:
        raise ResourceError(
            "E918", f"cannot listen on {args.host}:{args.port} ({e.strerror or e})", "--port",
            "pick another --port (0: a free one), or stop what uses it",
        ) from None  # fmt: skip
    engine = server.engine
    try:
        if not args.no_preload:
            engine.cache.get(engine.catalog.find(engine.catalog.base_name))
        names = list(engine.catalog.entries())
        print(
            f"mlxpt serve: {server.url} ({len(names)} models: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''})"
        )
        sys.stdout.flush()
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        engine.stop()
    return 0
