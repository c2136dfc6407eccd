"""`mlxpt fuse RUN --out DIR`: merge a run's adapter into the base weights, verified."""

from __future__ import annotations

from mlxpt.commands.generate import add_load_args


def register(subparsers) -> None:
    p = subparsers.add_parser("fuse", help="merge a run's adapter into the base weights")
    p.add_argument("run", metavar="RUN", help="run folder (or adapter folder) from `mlxpt train`")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where to write the fused model folder",
    )
    p.add_argument(
        "--model",
        default=None,
        help="base model (default: the one in the run's config.json)",
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="write float weights even if the base is quantised",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an --out folder that an earlier mlxpt fuse wrote (never a run, a model or other files)",
    )
    add_load_args(p, quantize=None, quantize_help="how to load the base (default: as trained)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mlxpt.fuse import fuse

    r = fuse(
        args.run,
        args.out,
        args.model,
        args.dequantize,
        args.force,
        args.quantize,
        args.trust_remote_code,
    )
    kind = "quantised" if r.quantized else "float"
    print(
        f"fused: max |Δlogit| = {r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g}); "
        f"{r.fused_layers} adapter layers merged into {r.model}; {kind} weights at {r.out}"
    )
    return 0
