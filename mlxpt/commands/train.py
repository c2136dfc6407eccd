"""`mlxpt train [sft|dpo|simpo|orpo|rm|grpo]`: flags for every config field (CLI > YAML > defaults),
--resume, events. simpo and orpo are dpo with that loss (and SimPO's usual beta of 2)."""

from __future__ import annotations

import json
import sys

from mlxpt import config
from mlxpt.config import METHODS, AnyConfig, DPOConfig, GRPOConfig, RMConfig, SFTConfig, all_fields
from mlxpt.errors import EXIT_INTERRUPTED


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (sft, dpo, simpo, orpo, rm, grpo); no arguments: SFT of the bundled default",
        description=__doc__,
    )
    p.add_argument("method", nargs="?", default=None, choices=METHODS, help="training method (default: sft)")
    p.add_argument("--config", help="YAML file of settings (flat `name: value`, or grouped by section)")
    p.add_argument("--resume", metavar="RUN", help="continue a run folder from its newest complete checkpoint")
    p.add_argument(
        "--events", choices=["text", "json"], default="text", help="progress as text lines or one JSON object per line"
    )
    helps: dict[str, list[str]] = {}
    classes = (SFTConfig, DPOConfig, RMConfig, GRPOConfig)
    for cls in classes:  # every method's settings; a shared name gets every help
        for name, (_, f) in all_fields(cls()).items():
            h = f.metadata.get("help")
            if h and h not in helps.setdefault(name, []):
                helps[name].append(h)
    for name, (_, f) in {k: v for cls in classes for k, v in all_fields(cls()).items()}.items():
        kw = {"dest": f"cfg_{name}", "default": None, "help": "; grpo: ".join(helps.get(name, []))}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if str(f.type).startswith("bool"):
            p.add_argument(f"--{name.replace('_', '-')}", action="store_const", const=True, **kw)
        else:
            p.add_argument(f"--{name.replace('_', '-')}", metavar=name.upper(), **kw)
    p.set_defaults(func=run)


def flags_from_args(args) -> dict:
    """The settings given on the command line (`--rank 16` -> {"rank": "16"}); flags not given are left out."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_from_args(args) -> tuple[str, AnyConfig]:
    """(method, config) of a `mlxpt train` command line: argparse -> flags dict at this boundary;
    the rules (presets, YAML, resume) live in `mlxpt.config.build_config`, which the TUI calls too."""
    resume_config = None
    if args.resume:
        from mlxpt.runs import read_config

        resume_config = read_config(args.resume)
    resume = args.resume or None
    method = config.resolve_method(args.method, resume, resume_config)
    cfg = config.build_config(method, flags_from_args(args), args.config, resume=resume, resume_config=resume_config)
    return method, cfg


def _printer(mode: str, steps: int):
    every = max(1, steps // 40)

    def text(e: dict) -> None:
        kind = e["event"]
        if kind == "start":
            verb = f"resuming at step {e['resumed_from_step']}" if e["resumed_from_step"] else "new run"
            print(f"{verb}: {e['run_dir']}")
            print(
                f"  model {e['model']}  trainable {e['trainable_params'] / 1e6:.2f}M of {e['total_params'] / 1e6:.1f}M params"
                f"  train {e['train_rows']} rows, valid {e['valid_rows']}"
            )
            print(f"  memory estimate {e['memory_estimate_mb']:.0f} MB  BLAS {e['blas']}")
        elif kind == "step" and (e["step"] % every == 0 or e["step"] in (1, steps) or e["skipped"]):
            if e["skipped"]:
                print(f"step {e['step']:>5}/{steps}  non-finite loss or gradient: update skipped")
            else:
                print(
                    f"step {e['step']:>5}/{steps}  loss {e['loss']:.4f}  lr {e['lr']:.2e}  gnorm {e['grad_norm']:.3f}"
                    f"  {e['tokens_per_s']:.0f} tok/s  peak {e['peak_memory_mb']:.0f} MB"
                    + (f"  margin {e['margin']:.3f}  acc {e['accuracy']:.2f}" if "margin" in e else "")
                    + (
                        f"  reward {e['reward_mean']:.3f}±{e['reward_std']:.3f}  len {e['completion_len_mean']:.0f}"
                        + (f"  kl {e['kl']:.4f}" if "kl" in e else "")
                        + f"  clip {e['clip_fraction']:.3f}  gen {e['gen_tokens_per_s']:.0f} tok/s"
                        if "reward_mean" in e
                        else ""
                    )
                )
        elif kind == "eval":
            print(f"step {e['step']:>5}/{steps}  {eval_summary(e)}")
        elif kind == "reference" and e["status"] == "computing":
            print(
                f"reference log-probs (the untrained model, once per run): {e['done']}/{e['pairs']} pairs, {e['elapsed_s']:.0f} s"
            )
        elif kind == "reference":
            print(f"reference log-probs {e['status']} for {e['pairs']} pairs: {e['path']}")
        elif kind == "warning":
            print(f"warning: {e['message']}", file=sys.stderr)
        sys.stdout.flush()

    def as_json(e: dict) -> None:
        print(json.dumps(e), flush=True)

    return as_json if mode == "json" else text


def eval_summary(e: dict) -> str:
    """An eval event in one line: validation (loss, or GRPO's greedy reward) and the forgetting
    monitor's accuracy and KL on the regression data, whichever the event has."""
    parts = []
    if "val_loss" in e:
        parts.append(f"val_loss {e['val_loss']:.4f}")
    if "val_reward" in e:
        parts.append(f"val_reward {e['val_reward']:.3f}")
    if "val_accuracy" in e:
        parts.append(f"val_accuracy {e['val_accuracy']:.3f}")
    if "val_prompts" in e:
        parts.append(f"({e['val_prompts']} prompts, greedy)")
    if "regression_accuracy" in e:
        parts.append(f"regression acc {e['regression_accuracy']:.1f}%")
    if "regression_kl" in e:
        parts.append(f"KL to base {e['regression_kl']:.4f}")
    return "  ".join(parts)


def run(args) -> int:
    from mlxpt.runs.signals import exit_on_signal_after_stop

    with exit_on_signal_after_stop():  # the process ends when a stopped run returns: a second signal exits 130
        return _run(args)


def _run(args) -> int:
    method, cfg = config_from_args(args)
    from mlxpt.train.methods import run_method
    from mlxpt.train.runner import resume_command

    emit = _printer(args.events, cfg.train.steps)
    run_dir, outcome = run_method(method, cfg, resume_dir=args.resume, emit=emit)
    if outcome == "interrupted":
        from mlxpt.runs import latest_checkpoint

        if latest_checkpoint(run_dir) is None:
            what = "interrupted before the first step, nothing to save; the resume starts at step 0"
            print(f"{what}. Resume with: {resume_command(run_dir)}", file=sys.stderr)
        else:
            print(f"interrupted: checkpoint saved. Resume with: {resume_command(run_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.events == "text" and method == "rm":
        print(f"done: reward model saved in {run_dir}")
        print(
            f"use it: from mlxpt.decode.reward_model import load_reward_model; load_reward_model('{run_dir}').score(prompt, response)"
        )
    elif args.events == "text":
        print(f"done: adapter saved in {run_dir}")
        print(f'try it: mlxpt generate --adapter {run_dir} --prompt "..."')
    return 0
