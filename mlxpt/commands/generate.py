"""`mlxpt generate`: stream a completion for one prompt to stdout, speed on stderr.

`--strategy best-of-n|self-consistency|beam|sample --n N` runs a test-time scaling strategy
instead (decode/strategies.py): the chosen answer goes to stdout, the scores or votes to stderr.
Both paths run `run_strategy` on the DecodeConfig of the flags (`decode_config`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlxpt.decode.options import DEFAULT_TEMPERATURE
from mlxpt.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"


def add_model_args(p) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"model: alias, HF/MLX folder, .gguf or hub id (default: the run's model, else {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--adapter",
        default=None,
        metavar="RUN",
        help="run folder (or adapter folder) whose adapter to apply",
    )
    add_load_args(p)


def check_adapter(adapter: str | Path, flag: str = "--adapter") -> None:
    """A run or adapter folder (--adapter, --compare, --policy) with adapter files and a config
    that can be loaded (E221, E703, ...), and not a reward model's or PRM's backbone (E579: it
    once generated as if it were a policy), checked before any weights load."""
    from mlxpt.models.adapters import find_adapter, read_adapter_config
    from mlxpt.models.chaining import refuse_reward_model

    folder = find_adapter(adapter)
    for f in {Path(adapter), folder}:
        refuse_reward_model(f, flag, f"{flag} {adapter}")
    read_adapter_config(folder)


def add_extract_arg(p, default: str = "auto") -> None:
    """--extract: how a final answer is read from a completion (rewards/extract.py's METHODS; not
    imported here, which would load the reward functions and NumPy for a --help)."""
    p.add_argument(
        "--extract", default=default, help="answer extractor: auto, tag, boxed, hash, answer, last_number, re:REGEX"
    )


def progress_printer(prefix: str, t0: float):
    """`progress(done, total)` for a command that works through prompts: on a terminal one line
    updated in place; in a log file a line each time a tenth is passed and at the end, also when
    `done` jumps several prompts at once (batched decoding)."""
    import time

    live, shown = sys.stderr.isatty(), [0]

    def progress(done: int, total: int) -> None:
        line = f"{prefix} {done}/{total} prompts, {time.perf_counter() - t0:.0f} s"
        if live:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif done == total or done * 10 // total > shown[0] * 10 // total:
            print(line, file=sys.stderr, flush=True)
        shown[0] = done

    return progress


def add_load_args(p, quantize: str | None = "auto", quantize_help: str = "auto, none (float), 4 or 8 bit") -> None:
    """--quantize and --trust-remote-code: how the base weights load (generate, chat, eval, fuse)."""
    p.add_argument(
        "--quantize", default=quantize, choices=("auto", "none", "4", "8"), help=f"base weights: {quantize_help}"
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model folders that run their own Python code",
    )


def add_sampling_args(p) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per answer")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"sampling temperature (0: greedy; default 0, or {DEFAULT_TEMPERATURE} for sampled strategies)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample from the K most likely tokens (0: off)",
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens below min-p x the top probability (0: off)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="penalise repeated tokens (>1 penalises; default off)",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt, optionally with an adapter")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument(
        "--prompt-file",
        metavar="FILE",
        help="read the prompt from a UTF-8 file ('-': stdin)",
    )
    p.add_argument("--system", default=None, help="system prompt (chat template only)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="feed the prompt as is, without the chat template",
    )
    add_sampling_args(p)
    add_strategy_args(p)
    p.set_defaults(func=run)


def add_strategy_args(p) -> None:
    from mlxpt.decode.options import STRATEGY_NAMES

    g = p.add_argument_group("test-time scaling")
    g.add_argument(
        "--strategy",
        default=None,
        help=f"decoding strategy: {', '.join(STRATEGY_NAMES)} (default: one streamed decode)",
    )
    g.add_argument("--n", type=int, default=8, help="samples (best-of-n, self-consistency, sample) or beam width")
    g.add_argument(
        "--scorer",
        default=None,
        help="best-of-n scorer: logprob (default), verifier, verifier:file.py:fn, reward:NAME, reward:file.py:fn, rm:RUN, prm:RUN, prm+verifier:RUN",
    )
    add_extract_arg(g)
    g.add_argument(
        "--weighting", default="none", help="self-consistency vote weights: none, logprob, reward (uses --scorer)"
    )
    g.add_argument("--adaptive", action="store_true", help="self-consistency: stop early once the vote is decided")
    g.add_argument("--batch", type=int, default=4, help="adaptive: samples drawn between stopping checks")
    g.add_argument(
        "--confidence", type=float, default=0.95, help="adaptive: stop at this P(leader wins) (1: only when safe)"
    )
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam: score = log-prob / length**this")
    g.add_argument("--show-samples", action="store_true", help="print every sample (stderr)")
    add_search_args(p)
    g = p.add_argument_group("compute-optimal scaling (--strategy auto; docs/compute-optimal.md)")
    g.add_argument("--budget", default=None, help="auto: generated tokens per answer")
    g.add_argument(
        "--calibration", nargs="+", metavar="TABLE", default=None,
        help="auto: table(s) from `mlxpt eval --calibrate`; several are pooled (default: built-in)",
    )  # fmt: skip


def add_search_args(p) -> None:
    """The step-search flags of `--strategy step-beam | tree` (values checked by check_search)."""
    from mlxpt.decode.options import SearchConfig

    d = SearchConfig()
    g = p.add_argument_group("step-level search (--strategy step-beam | tree)")
    g.add_argument("--beam-width", default=None, help="partial solutions kept per step; dvts: subtrees (default: --n)")
    g.add_argument("--expand", default=str(d.expand), help="sampled next steps per expanded partial solution")
    g.add_argument(
        "--step-delimiter", default=None,
        help="a step ends at this string (default: a prm:RUN scorer's own, else \\n, a newline)",
    )  # fmt: skip
    g.add_argument("--step-aggregate", default=d.aggregate, help="step scores -> value: min, last, product")
    g.add_argument("--max-steps", default=str(d.max_steps), help="most steps in one solution")
    g.add_argument("--dvts", action="store_true", help="step-beam: independent subtrees (diverse verifier tree search)")
    g.add_argument("--tree-search", default=d.tree_search, help="tree: bfs or dfs (depth first, backtracking)")
    g.add_argument("--prune-threshold", default=None, help="drop partial solutions valued below this (e.g. 0.3)")
    g.add_argument("--max-nodes", default=str(d.max_nodes), help="most steps sampled in one search")
    g.add_argument("--max-search-tokens", default=None, help="most tokens generated in one search (default: no limit)")
    g.add_argument("--max-seconds", default=None, help="wall-clock limit of one search (default: none)")


def _number(value, flag: str, kind=int):
    """A flag's text as int / float (None stays None); ConfigError E637 when it is not one."""
    if value is None or isinstance(value, (int, float)):
        return value
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError("E637", f"{flag} {value!r} is not {what}", flag, f"give {what}") from None


def search_config(args):
    """The SearchConfig of the step-search flags (escapes such as \\n in --step-delimiter decoded;
    without the flag, None: a PRM scorer's own delimiter, else a newline)."""
    from mlxpt.data.stepwise import step_delimiter
    from mlxpt.decode.options import SearchConfig

    delimiter = None if args.step_delimiter is None else step_delimiter(args.step_delimiter)
    return SearchConfig(
        beam_width=_number(args.beam_width, "--beam-width"), expand=_number(args.expand, "--expand"),
        delimiter=delimiter, aggregate=args.step_aggregate, max_steps=_number(args.max_steps, "--max-steps"),
        dvts=args.dvts, tree_search=args.tree_search,
        prune_threshold=_number(args.prune_threshold, "--prune-threshold", float),
        max_nodes=_number(args.max_nodes, "--max-nodes"),
        max_search_tokens=_number(args.max_search_tokens, "--max-search-tokens"),
        max_seconds=_number(args.max_seconds, "--max-seconds", float),
    )  # fmt: skip


def default_temperature(args) -> float:
    """0 for one plain decode, greedy and beam; the library's DEFAULT_TEMPERATURE for the rest."""
    strategy = getattr(args, "strategy", None)
    return 0.0 if strategy in (None, "greedy", "beam") else DEFAULT_TEMPERATURE


def check_strategy_args(args) -> None:
    """Validate the strategy flags (E620+) before any weights load."""
    from mlxpt.decode.beam import check_beam
    from mlxpt.decode.options import STEP_STRATEGIES, check_search, check_strategy, reads_scorer
    from mlxpt.decode.scorers import check_base_model, check_spec, search_delimiter
    from mlxpt.rewards.extract import check_method

    if args.strategy is None:
        return
    if args.strategy in ("greedy", "beam") and args.temperature:  # beam's was once ignored without a word
        raise ConfigError(
            "E626",
            f"--strategy {args.strategy} with a temperature",
            "--temperature",
            "drop --temperature, or use --strategy sample" + ("" if args.strategy == "greedy" else " or best-of-n"),
        )
    if args.adaptive and args.strategy not in ("self-consistency", "auto"):
        raise ConfigError(
            "E626", f"--adaptive with --strategy {args.strategy}: adaptive stopping ends a vote", "--adaptive",
            "use --strategy self-consistency, or drop --adaptive",
        )  # fmt: skip
    confidence = None if args.confidence >= 1 else args.confidence
    check_strategy(args.strategy, args.n, args.weighting, args.batch, confidence)
    check_method(args.extract)
    if args.strategy == "beam":
        check_beam(args.n, args.length_penalty)
    if args.strategy in STEP_STRATEGIES:
        check_search(search_config(args), args.strategy, args.temperature)
    if args.scorer is not None:
        check_spec(args.scorer)
        if reads_scorer(args.strategy, args.weighting):
            check_base_model(args.scorer, model_ref(args.model, args.adapter) or DEFAULT_MODEL)
        if args.strategy in STEP_STRATEGIES:
            search_delimiter(args.scorer, search_config(args).delimiter)  # E638: not the PRM's
    if args.strategy in ("best-of-n", "self-consistency", "sample") and args.n > 1 and args.temperature == 0:
        raise ConfigError(
            "E626",
            f"temperature 0 makes all {args.n} samples the same",
            "--temperature",
            "use a positive temperature such as 0.7, or --strategy greedy",
        )


def model_ref(model: str | None, adapter: str | None) -> str | None:
    """The model to load for `adapter`: `model`, else the run's base model, else the base an
    mlx-lm adapter folder names in its adapter_config.json (`model`; the default model was once
    loaded under it instead); None where none is known (load_for then loads DEFAULT_MODEL)."""
    if model is None and adapter is not None:
        import json

        from mlxpt.fuse import base_model_of

        found = (base_model_of(adapter) or {}).get("model")
        if found is None:
            folder = Path(adapter) if Path(adapter).is_dir() else Path(adapter).parent
            try:
                named = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("model")
            except (OSError, ValueError, AttributeError):
                named = None
            found = named if isinstance(named, str) and named.strip() else None
        return found
    return model


def check_auto_args(args):
    """The calibration table of --strategy auto (checked against the model and adapter), or None;
    E650-E653 before any weights load."""
    from mlxpt.decode.budget import load_table, parse_budgets

    if args.budget is not None and not isinstance(args.budget, int):
        budgets = parse_budgets(args.budget)
        if len(budgets) > 1:
            raise ConfigError("E650", f"--budget {args.budget!r} is a list", "--budget", "give one number of tokens")
        args.budget = budgets[0]
    args.calibration_table = None
    if args.calibration is not None:
        args.calibration_table = load_table(
            args.calibration, model=model_ref(args.model, args.adapter) or "", adapter=args.adapter
        )
    return args.calibration_table


def sampling_config(args):
    from mlxpt.decode.sampling import SamplingConfig

    return SamplingConfig(args.temperature, args.top_p, args.top_k, args.min_p, args.seed, args.repetition_penalty)


def decode_config(args):
    """The DecodeConfig of the flags (after check_common set the temperature). Without --strategy:
    one streamed decode with the sampling flags (`greedy` at temperature 0, else one `sample`)."""
    from mlxpt.decode.options import DecodeConfig

    if args.strategy is None:
        return DecodeConfig("greedy" if args.temperature == 0 else "sample", 1, args.max_tokens, sampling_config(args))
    from mlxpt.decode.options import check_decode

    confidence = None if args.confidence >= 1 else args.confidence
    auto = args.strategy == "auto"
    cfg = DecodeConfig(
        args.strategy, args.n, args.max_tokens, sampling_config(args), args.scorer, args.extract, args.weighting,
        args.adaptive, args.batch, confidence, args.length_penalty, search=search_config(args),
        budget=args.budget if auto else None, calibration=getattr(args, "calibration_table", None) if auto else None,
    )  # fmt: skip
    if auto:
        check_decode(cfg)  # auto without --budget: E651 before any weights load
    return cfg


def check_common(args) -> None:
    """Validate flags and the adapter before any weights load."""
    from mlxpt.decode.sampling import validate_sampling

    if args.temperature is None:
        args.temperature = default_temperature(args)
    validate_sampling(args.temperature, args.top_p, args.top_k, args.min_p, args.seed)
    if args.max_tokens < 1:
        raise ConfigError(
            "E604",
            f"max-tokens={args.max_tokens} is out of range",
            "--max-tokens",
            "use a whole number >= 1",
        )
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise ConfigError(
            "E605",
            f"repetition-penalty={args.repetition_penalty} is out of range",
            "--repetition-penalty",
            "use a value > 0",
        )
    if args.adapter is not None:
        check_adapter(args.adapter)


def load_for(args):
    """(model, tokenizer) for --model/--adapter; the model defaults to the run's base model."""
    from mlxpt.models.loader import load

    return load(
        model_ref(args.model, args.adapter) or DEFAULT_MODEL,
        adapter=args.adapter,
        quantize=args.quantize,
        trust_remote_code=args.trust_remote_code,
    )


def stats_line(last) -> str:
    return (
        f"[prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
        f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | {last.finish_reason}]"
    )


def _read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                "E606",
                f"cannot read the prompt file ({type(e).__name__})",
                args.prompt_file,
                "pass a UTF-8 text file",
            ) from None
    if not text.strip():
        raise ConfigError("E602", "the prompt is empty", "--prompt", "give a non-empty prompt")
    return text


def describe(result) -> list[str]:
    """Lines for stderr: the votes or scores of a strategy result, then its cost."""
    lines = []
    if result.votes is not None:
        total = sum(result.votes.values())
        ranked = sorted(result.votes.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{a}: {c}" for a, c in ranked[:8])
        voters = len(result.samples)  # auto: the chosen vote's samples, not every probe sample (n_used)
        lines.append(f"[votes ({total} of {voters} samples gave an answer): {shown} -> {result.answer}]")
        if result.weights:
            lines.append("[weights: " + ", ".join(f"{a}: {w:.3f}" for a, w in result.weights.items()) + "]")
    if result.scores is not None and result.strategy in ("best-of-n", "beam"):
        best = max(range(len(result.scores)), key=lambda i: result.scores[i])
        shown = ", ".join(("*" if i == best else "") + f"{s:.3f}" for i, s in enumerate(result.scores))
        lines.append(f"[scores: {shown}]")
    if getattr(result, "search", None):
        sr = result.search
        steps = ", ".join(f"{v:.2f}" for v in sr["step_scores"])
        lines.append(
            f"[search: {sr['nodes']} steps sampled, {sr['solutions']} solutions, {sr['pruned']} pruned, "
            f"{sr['backtracks']} backtracks, depth {sr['depth']}, stopped by {sr['stopped_by']}; "
            f"{result.prefilled_tokens} tokens prefilled; best path's step scores: {steps}]"
        )
    lines.append(
        f"[{result.strategy}: {result.n_used} samples, {result.generated_tokens} tokens, {result.seconds:.1f} s, "
        f"{result.generated_tokens / max(result.seconds, 1e-9):.1f} tok/s]"
    )
    return lines


def run_with_strategy(args, model, tokenizer, tokens, prompt, cfg=None) -> str:
    """Run args.strategy (or `cfg`) on `tokens`, print the answer (stdout) and its votes/scores and
    auto's choice (stderr); `prompt` is what scorers see (chat: the history)."""
    from mlxpt.decode.budget import describe as describe_auto
    from mlxpt.decode.strategies import run_strategy

    result = run_strategy(model, tokenizer, tokens, cfg or decode_config(args), prompt=prompt)
    print(result.text)
    sys.stdout.flush()
    if args.show_samples:
        for i, text in enumerate(result.samples):
            score = f" score {result.scores[i]:.3f}" if result.scores else ""
            print(f"--- sample {i + 1} (answer {result.answers[i]}){score}\n{text}", file=sys.stderr)
    if result.auto is not None:
        print(f"[{describe_auto(result.auto)}]", file=sys.stderr)
    for line in describe(result):
        print(line, file=sys.stderr)
    return result.text


def stream(model, tokenizer, tokens, cfg, prompt, seen: list) -> None:
    """One streamed decode of `cfg` (cfg.streamed): its text goes to stdout as it comes, and every
    chunk into `seen` (kept when Ctrl-C stops the decode; the last one has the speeds)."""
    from mlxpt.decode.strategies import run_strategy

    def show(chunk) -> None:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        seen.append(chunk)

    run_strategy(model, tokenizer, tokens, cfg, prompt=prompt, on_chunk=show)


def run(args) -> int:
    from mlxpt.decode.generate import chat_prompt

    text = _read_prompt(args)
    check_common(args)
    check_strategy_args(args)
    for flag, value in (("--budget", args.budget), ("--calibration", args.calibration)):
        if value is not None and args.strategy != "auto":  # once ignored without a word (chat keeps
            raise ConfigError(  # them for a later /strategy auto)
                "E651", f"{flag} is a setting of --strategy auto", flag, f"add --strategy auto, or drop {flag}"
            )
    if args.raw and args.system is not None:
        raise ConfigError("E608", "--system with --raw: a raw prompt has no chat template to hold it", "--system",
                          "drop one of them")  # fmt: skip
    check_auto_args(args)
    decode_config(args)  # every strategy setting checked before the weights load
    model, tokenizer = load_for(args)
    if args.raw:
        tokens = list(tokenizer.encode(text))
    else:
        tokens = chat_prompt(tokenizer, [{"role": "user", "content": text}], system=args.system)
    cfg = decode_config(args)
    if not cfg.streamed:
        run_with_strategy(args, model, tokenizer, tokens, text)
        return 0
    seen: list = []
    stream(model, tokenizer, tokens, cfg, text, seen)  # no strategy, greedy, or one sample
    sys.stdout.write("\n")
    sys.stdout.flush()
    if seen:
        print(stats_line(seen[-1]), file=sys.stderr)
    return 0
