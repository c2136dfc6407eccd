"""`mlxpt fuse RUN --out DIR [--export gguf ...]`: merge a run's adapter into the base weights,
verified, and optionally export it (GGUF, Ollama Modelfile, Hub upload)."""

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
    e = p.add_argument_group("export")
    e.add_argument("--export", default=None, metavar="FORMAT", help="also write the fused model as: gguf")
    e.add_argument(
        "--gguf-type", default=None, metavar="TYPE", help="GGUF weight type: f16 (default) or q8_0 (half the size)"
    )
    e.add_argument("--ollama", action="store_true", help="write an Ollama Modelfile beside the GGUF")
    e.add_argument(
        "--upload-repo",
        default=None,
        metavar="OWNER/NAME",
        help="write a model card and push the fused folder to this Hugging Face repo (private if new)",
    )
    e.add_argument("--dry-run", action="store_true", help="with --upload-repo: write the folder, list it, push nothing")
    add_load_args(p, quantize=None, quantize_help="how to load the base (default: as trained)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mlxpt.fuse import ExportConfig, fuse

    export = ExportConfig(args.export, args.gguf_type, args.ollama, args.upload_repo, args.dry_run)
    r = fuse(
        args.run,
        args.out,
        args.model,
        args.dequantize,
        args.force,
        args.quantize,
        args.trust_remote_code,
        export,
    )
    kind = "quantised" if r.quantized else "float"
    print(
        f"fused: max |Δlogit| = {r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g}); "
        f"{r.fused_layers} adapter layers merged into {r.model}; {kind} weights at {r.out}"
    )
    if r.gguf is not None:
        size = r.gguf.stat().st_size / 2**20
        print(
            f"gguf: {r.gguf} ({size:.1f} MiB); read back max |Δlogit| = {r.gguf_diff:.3g} (tolerance {r.gguf_tol:.3g})"
        )
    if r.modelfile is not None:
        print(f"ollama: {r.modelfile} (ollama create NAME -f {r.modelfile})")
    if r.upload_files is not None:
        verb = "would upload" if r.upload_url is None else "uploaded"
        print(f"hub: {verb} {len(r.upload_files)} files to {args.upload_repo}: {', '.join(r.upload_files)}")
        if r.upload_url:
            print(f"hub: {r.upload_url}")
    return 0
