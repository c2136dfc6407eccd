"""`mlxpt data check FILE`: counts, token lengths, rejected rows with reasons, masked preview.
`mlxpt data convert IN --out OUT`: Alpaca, ShareGPT or TRL rows rewritten in mlxpt's own format.
`mlxpt data self-answers --prompts FILE --out FILE`: a model's own greedy answers as SFT rows, the
rows to `--replay` so that fine-tuning keeps the model's general behaviour.
`mlxpt data label-steps --policy RUN --data FILE --rollouts K --out FILE`: automatic step labels
(Math-Shepherd) for `mlxpt train prm`, resumable."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mlxpt.errors import ConfigError

HELP = (
    "check a dataset (counts, lengths, errors, a masked preview), convert other tools' formats, "
    "write a model's own answers for --replay, or label solution steps for a process reward model"
)
METHOD_CHOICES = ["auto", "sft", "dpo", "simpo", "orpo", "rm", "grpo", "prm"]


def register(sub) -> None:
    p = sub.add_parser("data", help=HELP)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    c = dsub.add_parser("check", help="validate a JSONL file or a folder with train.jsonl / valid.jsonl")
    c.add_argument("path", help="train JSONL file or data folder")
    c.add_argument("--valid", help="validation JSONL file")
    c.add_argument("--model", help="tokenise with this model's tokenizer (alias, folder, .gguf)")
    c.add_argument("--mask", default="assistant", choices=["assistant", "prompt", "none"], help="trained tokens")
    c.add_argument("--max-seq-len", type=int, default=512, help="longest sequence in tokens")
    c.add_argument(
        "--method", default="auto", choices=METHOD_CHOICES,
        help="the method the data is for (auto: preference pairs, stepwise rows, GRPO prompts or SFT rows, from the first row)",
    )  # fmt: skip
    c.add_argument("--color", action="store_true", default=None, help="mark trained tokens with colour")
    c.set_defaults(func=run)
    v = dsub.add_parser(
        "convert", help="rewrite Alpaca, ShareGPT or TRL rows in mlxpt's own format (counts per source format)"
    )
    v.add_argument("path", metavar="IN", help="JSONL file in any format `data check` accepts")
    v.add_argument("--out", required=True, metavar="OUT", help="where to write the converted JSONL (never IN)")
    v.add_argument(
        "--method", default="auto", choices=METHOD_CHOICES,
        help="the method the data is for (auto: from the first row, as `data check` does)",
    )  # fmt: skip
    v.set_defaults(func=run_convert)
    register_self_answers(dsub)
    register_label_steps(dsub)


def register_self_answers(dsub) -> None:
    from mlxpt.commands.generate import add_model_args

    s = dsub.add_parser(
        "self-answers",
        help="the model's own greedy answers to prompts, written as SFT chat rows (replay them with --replay)",
    )
    s.add_argument("--prompts", required=True, metavar="FILE", help='JSONL of {"prompt", "system"?} or {"messages"}')
    s.add_argument("--out", required=True, metavar="FILE", help="where to write the SFT rows (JSONL)")
    add_model_args(s)
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
    s.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy answers)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0 (1: off)")
    s.add_argument("--seed", type=int, default=None, help="seed of sampled answers (same seed, same answers)")
    s.set_defaults(func=run_self_answers)


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
        what = {"pref": "preference methods (dpo, simpo, orpo, rm)", "stepwise": "prm"}.get(kind, "grpo")
        text = f"data for {what}\n{text}"
    print(text)
    return 1 if n_errors else 0


def check_self_answers_out(out: Path, inputs: dict, kind: str = "self-answers") -> None:
    """Refuse an --out that is (symlinks and hard links followed), contains or lies inside an
    input, lies in a run folder, or cannot be written as a file; nothing is touched."""
    import os

    from mlxpt.runs.guards import check_output, check_writable, is_run_dir

    o = check_output(out, inputs, kind, existing=False)
    for what, path in inputs.items():
        if path is not None and o.is_file() and Path(path).exists() and os.path.samefile(o, path):
            raise ConfigError(
                "E617", f"the output is the {what} ({path}) under another name: writing there would destroy it",
                str(out), "choose a new file",
            )  # fmt: skip
    for folder in (o, *o.parents):
        if folder.is_dir() and is_run_dir(folder):
            raise ConfigError(
                "E617", f"the output lies in the run folder {folder}: writing there would change the run", str(out),
                "write the file outside every run folder",
            )  # fmt: skip
        if folder != o and _is_model_folder(folder):
            raise ConfigError(
                "E617", f"the output lies in the model folder {folder}: writing there could destroy the model",
                str(out), "write the file outside every model folder",
            )  # fmt: skip
    check_writable(out, "--out")


def _is_model_folder(folder: Path) -> bool:
    """A Hugging Face / MLX model folder: a config.json beside weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def run_convert(args) -> int:
    from mlxpt.data.check import data_kind, detect_data_kind
    from mlxpt.data.convert import convert_rows, jsonl_text
    from mlxpt.runs.atomic import atomic_write_text

    out = Path(args.out)
    check_self_answers_out(out, {"input file": args.path}, "convert")  # before anything is read
    kind = detect_data_kind(args.path) if args.method == "auto" else data_kind(args.method)
    if kind == "stepwise":
        rows, sources, dropped = _convert_stepwise(args.path)
    else:
        rows, sources, dropped = convert_rows(args.path, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, jsonl_text(rows))
    counts = ", ".join(f"{n} {name}" for name, n in sources.most_common())
    what = {"pref": "preference pairs", "prompts": "GRPO prompts", "stepwise": "stepwise rows"}.get(kind, "SFT rows")
    note = f"; {dropped} identical pairs dropped" if dropped else ""
    print(f"wrote {len(rows)} {what} to {out}: {counts}{note}")
    return 0


def self_answers(
    model, tokenizer, rows: list, max_tokens: int, batch_size: int, progress, sampler=None
) -> tuple[list[dict], dict]:
    """(SFT rows, counts): each prompt's greedy answer (or one drawn by `sampler`) appended as the
    assistant turn, in the prompts' order. Empty answers are dropped and counted; answers cut at
    `max_tokens` are kept and counted. Without a chat template the rows are completions (what the model saw)."""
    from mlxpt.decode.batch import generate_many
    from mlxpt.decode.generate import chat_prompt

    chat = bool(getattr(tokenizer, "has_chat_template", False))
    out: list[dict] = []
    counts = {"prompts": len(rows), "rows": 0, "empty": 0, "cut": 0}
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        prompts = [chat_prompt(tokenizer, r.messages) for r in part]
        sampled = {"sampler": sampler} if sampler is not None else {}
        for r, c in zip(part, generate_many(model, tokenizer, prompts, max_tokens, **sampled), strict=True):
            if not c.text.strip():
                counts["empty"] += 1
                continue
            counts["cut"] += c.finish_reason == "length"
            if chat:
                out.append({"messages": [*r.messages, {"role": "assistant", "content": c.text}]})
            else:
                out.append({"prompt": r.messages[-1]["content"], "completion": c.text})
        progress(start + len(part), len(rows))
    counts["rows"] = len(out)
    return out, counts


def run_self_answers(args) -> int:
    import json

    from mlxpt.commands.generate import DEFAULT_MODEL, check_adapter, load_for, model_ref, progress_printer
    from mlxpt.data.formats import raise_if_errors
    from mlxpt.data.prompts import scan_prompts
    from mlxpt.models.loader import resolve
    from mlxpt.runs.atomic import atomic_write_text

    out = Path(args.out)
    inputs = {"prompts file": args.prompts, "adapter run": args.adapter}
    check_self_answers_out(out, inputs)  # before anything is read
    if args.max_tokens < 1:
        raise ConfigError("E604", f"max-tokens={args.max_tokens} is out of range", "--max-tokens", "use 1 or more")
    if args.batch_size < 1:
        raise ConfigError("E640", f"batch-size={args.batch_size} is out of range", "--batch-size", "use 1 or more")
    from mlxpt.decode.sampling import validate_sampling

    validate_sampling(args.temperature, args.top_p, seed=args.seed)  # E601, before anything loads
    rows, errors = scan_prompts(args.prompts)
    raise_if_errors(errors, Path(args.prompts).name)  # every prompt checked before any weights load
    if args.adapter is not None:
        check_adapter(args.adapter)
    if args.model is None:  # load_for's choice: the run's base model, else the default
        args.model = model_ref(None, args.adapter) or DEFAULT_MODEL
    check_self_answers_out(out, {**inputs, "model": resolve(args.model)})
    model, tokenizer = load_for(args)
    t0 = time.perf_counter()
    progress = progress_printer("self-answers:", t0)
    live = sys.stderr.isatty()

    sampler = None
    if args.temperature > 0:  # greedy stays the default: the replay rows are then the model's most likely answers
        from mlxpt.decode.sampling import make_sampler

        sampler = make_sampler(args.temperature, args.top_p, seed=args.seed)
    answers, counts = self_answers(model, tokenizer, rows, args.max_tokens, args.batch_size, progress, sampler)
    if live:
        print(file=sys.stderr)
    if not answers:
        raise ConfigError(
            "E641", f"every one of the {counts['prompts']} answers was empty; nothing written", args.prompts,
            "check the prompts and the model (an instruct model with a chat template answers best)",
        )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answers))
    print(
        f"wrote {counts['rows']} rows to {out} ({counts['empty']} empty answers dropped, {counts['cut']} cut at "
        f"--max-tokens {args.max_tokens}) in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return 0


def _convert_stepwise(path: str):
    """(rows in TRL's stepwise form, rows per source form, 0); every row checked first."""
    from collections import Counter

    from mlxpt.data.formats import raise_if_errors
    from mlxpt.data.stepwise import as_trl_row, scan_stepwise

    rows, errors = scan_stepwise(path)
    raise_if_errors(errors, Path(path).name)
    return [as_trl_row(r) for r in rows], Counter(r.source for r in rows), 0


def register_label_steps(dsub) -> None:
    from mlxpt.commands.generate import add_extract_arg, add_load_args
    from mlxpt.decode.label_steps import LabelSettings

    d = LabelSettings("", "")
    s = dsub.add_parser(
        "label-steps",
        help="label each step of a policy's sampled solutions by K continuations from it (Math-Shepherd), for train prm",
    )
    s.add_argument(
        "--policy",
        required=True,
        metavar="RUN_OR_MODEL",
        help="a run folder (its adapter on its base model) or a model",
    )
    s.add_argument("--data", required=True, metavar="FILE", help='JSONL of GRPO prompts {"prompt", "answer"}')
    s.add_argument("--out", required=True, metavar="FILE", help="stepwise rows (JSONL); rerun to continue it")
    s.add_argument(
        "--rollouts",
        type=int,
        default=d.rollouts,
        metavar="K",
        help="continuations sampled from every step (default %(default)s)",
    )
    how = s.add_mutually_exclusive_group()
    how.add_argument(
        "--soft",
        dest="soft",
        action="store_true",
        default=True,
        help="label = share of continuations that reach the answer (default)",
    )
    how.add_argument("--hard", dest="soft", action="store_false", help="label = whether any continuation reaches it")
    s.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        help="most tokens of the solution and of each continuation (default %(default)s)",
    )
    s.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="skip solutions with more steps than this (default %(default)s)",
    )
    s.add_argument(
        "--temperature", type=float, default=d.temperature, help="sampling temperature, > 0 (default %(default)s)"
    )
    s.add_argument("--seed", type=int, default=d.seed, help="seed; prompt i samples from seed + i")
    s.add_argument("--step-delimiter", default="\\n", help="text that ends a step (default \\n, a newline)")
    add_extract_arg(s, d.extract)
    s.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N prompts")
    add_load_args(s)
    s.set_defaults(func=run_label_steps)


def _policy(policy: str) -> tuple[str, str | None]:
    """(model reference, adapter or None) of --policy: a run or adapter folder, else a model."""
    from mlxpt.commands.generate import check_adapter
    from mlxpt.fuse import base_model_of
    from mlxpt.models.chaining import refuse_reward_model
    from mlxpt.runs.guards import is_run_dir

    p = Path(policy)
    if not (p.is_dir() and (is_run_dir(p) or (p / "adapter_config.json").is_file())):
        return policy, None
    refuse_reward_model(p, "--policy", f"--policy {policy}")  # a reward model's or PRM's backbone
    check_adapter(p)
    base = base_model_of(p)
    if base is None:
        raise ConfigError(
            "E534", "an adapter folder without a run's config.json: its base model is unknown", policy,
            "pass the run folder, or fuse the adapter and pass the fused model",
        )  # fmt: skip
    return base["model"], str(p)


def run_label_steps(args) -> int:
    import dataclasses

    from mlxpt.data.formats import raise_if_errors
    from mlxpt.data.prompts import scan_prompts
    from mlxpt.data.stepwise import check_delimiter
    from mlxpt.decode.label_steps import LabelSettings, OutputLock, check_settings, progress_path, start_point
    from mlxpt.models.loader import resolve
    from mlxpt.rewards.extract import check_method

    out = Path(args.out)
    inputs = {"prompts file": args.data, "policy": args.policy}
    check_self_answers_out(out, inputs, "label-steps")  # before anything is read
    check_self_answers_out(progress_path(out), inputs, "label-steps")
    settings = LabelSettings(
        str(Path(args.data).resolve()), args.policy, args.rollouts, args.soft, args.max_tokens, args.temperature,
        args.seed, check_delimiter(args.step_delimiter, "--step-delimiter"), args.extract, args.max_steps,
    )  # fmt: skip
    check_settings(settings)
    check_method(args.extract)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("E531", f"limit={args.limit} is out of range", "--limit", "use 1 or more")
    rows, errors = scan_prompts(args.data, require=("answer",))
    raise_if_errors(errors, Path(args.data).name)  # every prompt checked before any weights load
    rows = rows[: args.limit] if args.limit else rows
    model_ref, adapter = _policy(args.policy)
    if Path(args.policy).exists():  # a folder: the same one from any working directory
        settings = dataclasses.replace(settings, policy=str(Path(args.policy).resolve()))
    check_self_answers_out(out, {**inputs, "model": resolve(model_ref)}, "label-steps")
    start, _ = start_point(out, settings)  # refuses another job's OUT before the weights load
    if start >= len(rows):
        print(f"nothing to do: all {len(rows)} prompts of {args.data} are labelled in {out}", file=sys.stderr)
        return 0
    with OutputLock(out):  # one writer per OUT (E535), held until the job ends
        start, _ = start_point(out, settings)  # as it stands now that this job holds it
        return _label_locked(args, out, rows, settings, start, model_ref, adapter)


def _label_locked(args, out, rows, settings, start, model_ref, adapter) -> int:
    from mlxpt.decode.label_steps import label_steps
    from mlxpt.errors import EXIT_INTERRUPTED
    from mlxpt.models.loader import load

    model, tokenizer = load(
        model_ref, adapter=adapter, quantize=args.quantize, trust_remote_code=args.trust_remote_code
    )

    def progress(done: int, total: int, c) -> None:
        print(
            f"label-steps: {done}/{total} prompts, {c.rows} rows, {c.steps} steps labelled, "
            f"{c.correct_solutions} solutions right, {c.generated_tokens} tokens, {c.seconds:.0f} s",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    if start:
        print(f"label-steps: continuing {out} at prompt {start + 1} of {len(rows)}", file=sys.stderr)
    try:
        counts = label_steps(model, tokenizer, rows, out, settings, progress)
    except KeyboardInterrupt:
        print(f"interrupted: the complete rows are kept; rerun the same command to continue {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    skipped = f"{counts.no_steps} solutions without steps, {counts.too_many_steps} over --max-steps"
    print(f"wrote {counts.rows} stepwise rows to {out} ({skipped}) in {counts.seconds:.0f} s", file=sys.stderr)
    return 0
