"""`mlxpt generate`: stream a completion for one prompt to stdout, speed on stderr."""

from __future__ import annotations

import sys
from pathlib import Path

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
    p.add_argument(
        "--quantize",
        default="auto",
        choices=("auto", "none", "4", "8"),
        help="base weights: auto, none (float), 4 or 8 bit",
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
        default=0.0,
        help="sampling temperature (0: greedy)",
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
    p.set_defaults(func=run)


def check_common(args) -> None:
    """Validate flags and the adapter before any weights load."""
    from mlxpt.decode.sampling import validate_sampling

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
        from mlxpt.train.adapters import find_adapter, read_adapter_config

        read_adapter_config(find_adapter(args.adapter))


def load_for(args):
    """(model, tokenizer) for --model/--adapter; the model defaults to the run's base model."""
    from mlxpt.fuse import base_model_of
    from mlxpt.models.loader import load

    ref = args.model
    if ref is None and args.adapter is not None:
        ref = (base_model_of(args.adapter) or {}).get("model")
    return load(
        ref or DEFAULT_MODEL,
        adapter=args.adapter,
        quantize=args.quantize,
        trust_remote_code=args.trust_remote_code,
    )


def sampler_for(args):
    from mlxpt.decode.sampling import make_sampler

    return make_sampler(args.temperature, args.top_p, args.top_k, args.min_p, args.seed)


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


def run(args) -> int:
    from mlxpt.decode.generate import chat_prompt, iter_generate

    text = _read_prompt(args)
    check_common(args)
    model, tokenizer = load_for(args)
    if args.raw:
        tokens = list(tokenizer.encode(text))
    else:
        tokens = chat_prompt(tokenizer, [{"role": "user", "content": text}], system=args.system)
    sampler = sampler_for(args)
    last = None
    for chunk in iter_generate(model, tokenizer, tokens, args.max_tokens, sampler, args.repetition_penalty):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        print(stats_line(last), file=sys.stderr)
    return 0
