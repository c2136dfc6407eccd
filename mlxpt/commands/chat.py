"""`mlxpt chat`: a multi-turn terminal chat that keeps the history in the chat template.

Reads lines from stdin (so a pipe can drive it); `> ` is shown only on a terminal. Commands:
/reset clears the history, /system TEXT sets the system prompt and resets, /exit quits (as do
EOF and Ctrl-C at the prompt). Ctrl-C while an answer streams stops that answer only.
"""

from __future__ import annotations

import sys

from mlxpt.commands.generate import (
    add_model_args,
    add_sampling_args,
    check_common,
    load_for,
    sampler_for,
    stats_line,
)

HELP = "commands: /reset (clear history), /system TEXT (set system prompt, reset), /exit"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print speed after each answer (stderr)")
    add_sampling_args(p)
    p.set_defaults(func=run)


def _read(marker: str) -> str | None:
    """One line from stdin, or None at EOF / Ctrl-C."""
    try:
        return input(marker)
    except (EOFError, KeyboardInterrupt):
        return None


def _answer(model, tokenizer, tokens, args, sampler) -> str:
    from mlxpt.decode.generate import iter_generate

    parts, last = [], None
    try:
        for chunk in iter_generate(model, tokenizer, tokens, args.max_tokens, sampler, args.repetition_penalty):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            parts.append(chunk.text)
            last = chunk
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats and last is not None and last.finish_reason:
        print(stats_line(last), file=sys.stderr)
    return "".join(parts)


def run(args) -> int:
    from mlxpt.decode.generate import chat_prompt

    check_common(args)
    model, tokenizer = load_for(args)
    sampler = sampler_for(args)
    tty = sys.stdin.isatty()
    marker = "> " if tty else ""
    system, history = args.system, []
    if tty:
        print(HELP, file=sys.stderr)
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
                system, history = rest.strip() or None, []
                print(
                    f"[system prompt {'set' if system else 'cleared'}; history cleared]",
                    file=sys.stderr,
                )
            else:
                print(f"[unknown command {cmd}] {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        reply = _answer(model, tokenizer, chat_prompt(tokenizer, history, system), args, sampler)
        history.append({"role": "assistant", "content": reply})
