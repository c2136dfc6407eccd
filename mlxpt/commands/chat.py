"""`mlxpt chat`: a multi-turn terminal chat that keeps the history in the chat template.

Reads lines from stdin (so a pipe can drive it); `> ` is shown only on a terminal. Commands:
/reset clears the history, /system TEXT sets the system prompt and resets, /exit quits (as do
EOF and Ctrl-C at the prompt). Ctrl-C while an answer streams stops that answer only.
/strategy NAME switches the decoding strategy (greedy, sample, best-of-n, self-consistency, beam),
/n N sets the samples or beam width, /scorer SPEC the best-of-N scorer; votes or scores are
shown on stderr after each answer, and only the chosen answer enters the history. Every answer
runs `run_strategy` on the DecodeConfig of the current flags (streamed: greedy or one sample).
`--strategy auto --budget TOKENS [--calibration TABLE]` chooses the strategy per message within
the budget (docs/compute-optimal.md) and says what it chose and spent.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from mlxpt.commands.generate import (
    add_model_args,
    add_sampling_args,
    add_strategy_args,
    check_auto_args,
    check_common,
    check_strategy_args,
    decode_config,
    load_for,
    run_with_strategy,
    stats_line,
    stream,
)
from mlxpt.errors import MlxptError

HELP = (
    "commands: /reset (clear history), /system TEXT (set system prompt, reset), "
    "/strategy NAME, /n N, /scorer SPEC, /exit"
)


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print speed after each answer (stderr)")
    add_sampling_args(p)
    add_strategy_args(p)
    p.set_defaults(func=run)


def _read(marker: str) -> str | None:
    """One line from stdin, or None at EOF / Ctrl-C."""
    try:
        return input(marker)
    except (EOFError, KeyboardInterrupt):
        return None


def _answer(model, tokenizer, tokens, args, cfg, history) -> str:
    """One streamed answer (cfg.streamed); Ctrl-C stops it and keeps what was written."""
    seen: list = []
    try:
        stream(model, tokenizer, tokens, cfg, history, seen)
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats and seen and seen[-1].finish_reason:
        print(stats_line(seen[-1]), file=sys.stderr)
    return "".join(c.text for c in seen)


def _set(args, cmd: str, rest: str) -> None:
    """Apply /strategy, /n or /scorer to `args`, keeping the old values if the new ones are invalid."""
    from mlxpt.commands.generate import default_temperature

    old = (args.strategy, args.n, args.scorer, args.temperature)
    try:
        if cmd == "/strategy":
            user_temp = args.temperature != default_temperature(args)
            args.strategy = rest or None
            if args.strategy == "greedy" or not user_temp:
                args.temperature = default_temperature(args)
        elif cmd == "/n":
            args.n = int(rest)
        else:
            args.scorer = rest or None
        check_strategy_args(args)
        decode_config(args)
    except (MlxptError, ValueError) as e:
        args.strategy, args.n, args.scorer, args.temperature = old
        print(f"[{e.line() if isinstance(e, MlxptError) else f'not a whole number: {rest!r}'}]", file=sys.stderr)
        return
    print(
        f"[strategy {args.strategy or 'greedy'}, n {args.n}, scorer {args.scorer or 'logprob'}, "
        f"temperature {args.temperature:g}]",
        file=sys.stderr,
    )


def run(args) -> int:
    from mlxpt.decode.generate import chat_prompt

    check_common(args)
    check_strategy_args(args)
    check_auto_args(args)  # the calibration table, checked against the model, before the weights load
    decode_config(args)  # auto without --budget: E651 now, not at the first message
    model, tokenizer = load_for(args)
    # A streamed answer seeds MLX's generator (--seed) only as its sampler did before: once at the
    # start and after each /strategy, /n, /scorer; later turns continue the same random stream.
    reseed = True
    tty = sys.stdin.isatty()
    marker = "> " if tty else ""
    system, history = args.system, []
    chat_prompt(tokenizer, [{"role": "user", "content": "hi"}], system)  # E603 for --system now, not at the first line
    if tty:
        print(HELP, file=sys.stderr)
    if not getattr(tokenizer, "has_chat_template", False):
        print("[this model has no chat template: each message is answered on its own, without the history]",
              file=sys.stderr)  # fmt: skip
    while True:
        line = _read(marker)
        if line is None:
            if tty:
                print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd == "/exit":
                return 0
            if cmd == "/reset":
                history = []
                print("[history cleared]", file=sys.stderr)
            elif cmd == "/system":
                try:  # a template without a system role (or no template): say so, keep chatting
                    chat_prompt(tokenizer, [{"role": "user", "content": "hi"}], rest.strip() or None)
                except MlxptError as e:
                    print(f"[{e.line()}; the system prompt is unchanged]", file=sys.stderr)
                    continue
                system, history = rest.strip() or None, []
                print(
                    f"[system prompt {'set' if system else 'cleared'}; history cleared]",
                    file=sys.stderr,
                )
            elif cmd in ("/strategy", "/n", "/scorer"):
                _set(args, cmd, rest.strip())
                reseed = True
            else:
                print(f"[unknown command {cmd}] {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        tokens = chat_prompt(tokenizer, history, system)
        cfg = decode_config(args)
        if cfg.streamed:
            if not reseed:
                cfg = replace(cfg, sampling=replace(cfg.sampling, seed=None))
            reply = _answer(model, tokenizer, tokens, args, cfg, history)
        else:
            try:
                reply = run_with_strategy(args, model, tokenizer, tokens, history, cfg)
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr)
                reply = ""
            except MlxptError as e:  # e.g. a reward-model scorer that fails to load: keep chatting
                print(f"[{e.line()}]", file=sys.stderr)
                reply = ""
        reseed = False
        history.append({"role": "assistant", "content": reply})
