"""`mlxpt data check FILE`: counts, token lengths, rejected rows with reasons, masked preview."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("data", help="check a dataset: counts, lengths, errors, a masked preview")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    c = dsub.add_parser("check", help="validate a JSONL file or a folder with train.jsonl / valid.jsonl")
    c.add_argument("path", help="train JSONL file or data folder")
    c.add_argument("--valid", help="validation JSONL file")
    c.add_argument("--model", help="tokenise with this model's tokenizer (alias, folder, .gguf)")
    c.add_argument("--mask", default="assistant", choices=["assistant", "prompt", "none"], help="trained tokens")
    c.add_argument("--max-seq-len", type=int, default=512, help="longest sequence in tokens")
    c.add_argument(
        "--method", default="auto", choices=["auto", "sft", "dpo", "simpo", "orpo", "rm", "grpo"],
        help="the method the data is for (auto: preference pairs, GRPO prompts or SFT rows, from the first row)",
    )  # fmt: skip
    c.add_argument("--color", action="store_true", default=None, help="mark trained tokens with colour")
    c.set_defaults(func=run)


def run(args) -> int:
    from mlxpt.data.check import check_kind_report, check_report, data_kind, detect_data_kind

    tokenizer = None
    if args.model:
        from mlxpt.models.loader import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    color = sys.stdout.isatty() if args.color is None else args.color
    kind = detect_data_kind(args.path, args.valid) if args.method == "auto" else data_kind(args.method)
    if kind == "sft":
        text, n_errors = check_report(
            args.path, valid=args.valid, tokenizer=tokenizer, mask=args.mask, max_len=args.max_seq_len, color=color
        )
    else:
        text, n_errors = check_kind_report(kind, args.path, args.valid, tokenizer, args.max_seq_len)
        text = f"data for {'preference methods (dpo, simpo, orpo, rm)' if kind == 'pref' else 'grpo'}\n{text}"
    print(text)
    return 1 if n_errors else 0
