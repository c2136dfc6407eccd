"""`mlxpt train [sft|dpo|simpo|orpo|rm|grpo|rft]`: a flag for every config field (CLI > YAML > defaults),
--resume, events; `mlxpt train METHOD --help` lists that method's settings with their defaults and
choices. simpo and orpo are dpo with that loss (and SimPO's usual beta of 2)."""

from __future__ import annotations

import argparse
import json
import sys

from mlxpt import config
from mlxpt.config import (
    METHODS,
    AnyConfig,
    DPOConfig,
    GRPOConfig,
    PRMConfig,
    RFTConfig,
    RMConfig,
    SFTConfig,
    all_fields,
)
from mlxpt.errors import EXIT_INTERRUPTED


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (sft, dpo, simpo, orpo, rm, grpo); no arguments: SFT of the bundled default",
        description=__doc__,
        usage="mlxpt train [METHOD] [--config FILE] [--resume RUN] [--SETTING VALUE ...]",
        add_help=False,
    )
    p.add_argument("-h", "--help", action=_MethodHelp, help="this method's settings, defaults and choices")
    _add_common(p)
    # Every method's settings parse (help hidden), so a setting of another method reaches
    # build_config, whose one-line E504 names the method it belongs to.
    classes = (SFTConfig, DPOConfig, RMConfig, GRPOConfig, PRMConfig, RFTConfig, config.config_class("distill"))
    fields: dict = {}
    for cls in classes:
        for name, (_, f) in all_fields(cls()).items():
            fields.setdefault(name, []).append(f)
    for name, same in fields.items():
        # one name in several methods (DPO's and GRPO's loss_type): every method's choices parse,
        # build_config checks them per method (the last class's alone once refused `dpo --loss-type ipo`)
        choices = [c for f in same for c in f.metadata.get("choices") or ()]
        _add_setting(p, name, same[-1], argparse.SUPPRESS, list(dict.fromkeys(choices)) or None)
    p.set_defaults(func=run)


def _add_common(p) -> None:
    p.add_argument(
        "method",
        nargs="?",
        default=None,
        choices=METHODS,
        metavar="METHOD",
        help=f"{', '.join(METHODS)} (default: sft)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of settings (flat `name: value`, or grouped by section; mlx-lm's keys too), or a run folder: a new run with its settings",
    )
    p.add_argument("--resume", metavar="RUN", help="continue a run folder from its newest complete checkpoint")
    p.add_argument(
        "--events", choices=["text", "json"], default="text", help="progress as text lines or one JSON object per line"
    )
    p.add_argument(
        "--ranks", type=int, metavar="N", help="data-parallel on N local processes (mlx.launch -n N --backend ring)"
    )


def _add_setting(p, name: str, f, help_text: str, choices=None) -> None:
    flags = [f"--{name.replace('_', '-')}"]
    if name == "from_run":
        flags.insert(0, "--from")  # the short name people look for (mlx-lm: --resume-adapter-file)
    kw = {"dest": f"cfg_{name}", "default": None, "help": help_text}
    if str(f.type).startswith("bool"):  # --name / --no-name (packing is on by default)
        p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        return
    if choices or f.metadata.get("choices"):
        kw["choices"] = choices or f.metadata["choices"]
    else:
        kind = str(f.type)
        kw["metavar"] = {"from_run": "RUN"}.get(name) or (
            "N" if kind.startswith("int") else "X" if kind.startswith("float") else name.upper()
        )
    p.add_argument(*flags, **kw)


def _shown(value) -> str:
    """A default as the help shows it: bundled data by its place in the repo, not a machine path."""
    from pathlib import Path

    from mlxpt.config import ASSETS

    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(ASSETS):
        return f"bundled {Path(value).relative_to(ASSETS.parent)}"
    return str(value)


def method_help(method: str, named: bool = True) -> str:
    """`mlxpt train METHOD --help`: the method's own settings, grouped by section, each with its
    default (the method's preset applied) and its choices. `named=False`: no METHOD was given."""
    cfg = config.build_config(method)
    about = f"{method}: {DESCRIPTIONS[method]}"
    if not named:
        about += (
            f"\n\nNo METHOD given: these are {method}'s settings (the default method).\n"
            "See another method's with `mlxpt train METHOD --help`."
        )
    h = argparse.ArgumentParser(
        prog="mlxpt train",
        usage=f"mlxpt train {method if named else '[METHOD]'} [--config FILE] [--resume RUN] [--SETTING VALUE ...]",
        description=about,
        epilog="Every setting is also a key of the --config YAML file (flat, or under its section).\n"
        f"Other methods: mlxpt train {{{','.join(m for m in METHODS if m != method)}}} --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(h.add_argument_group("command"))
    for section in config.section_names(cfg):
        group = h.add_argument_group(section)
        obj = getattr(cfg, section)
        for f in config.section_fields(cfg, section):
            value = getattr(obj, f.name)
            text = f.metadata.get("help", "")
            default = "" if value is None or "default" in text else f" (default: {_shown(value)})"
            _add_setting(group, f.name, f, text.replace("%", "%%") + default)
    return h.format_help()


DESCRIPTIONS = {
    "sft": "supervised fine-tuning on chat, completions or text rows",
    "dpo": "direct preference optimisation on prompt/chosen/rejected pairs",
    "simpo": "SimPO: reference-free preference optimisation (dpo with loss_type simpo, beta 2)",
    "orpo": "ORPO: SFT on chosen plus an odds-ratio term (dpo with loss_type orpo)",
    "rm": "a reward model (scalar head) trained on preference pairs",
    "grpo": "GRPO: reinforcement learning on prompts with verifiable rewards",
    "rft": "RFT: rounds of sampling, keeping the verified completions and fine-tuning on them",
    "prm": "a process reward model (a score per step) trained on stepwise-labelled solutions",
    "distill": "distillation from a teacher (a model or a run): its token distributions (GKD) or its answers",
}


class _MethodHelp(argparse.Action):
    """-h/--help that prints the help of the method named before it (SFT's when none is)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        method = getattr(namespace, "method", None)
        sys.stdout.write(method_help(method or "sft", named=method is not None))
        parser.exit()


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
    # `--config RUN`: a run's saved settings, started fresh in a new folder, with its method
    asked = args.method or (None if resume else config.saved_method(args.config))
    method = config.resolve_method(asked, resume, resume_config)
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
            if e.get("from_run"):
                taken = f" (taking {', '.join(e['adopted'])})" if e.get("adopted") else ""
                print(f"  from {e['from_run']}{taken}")
        elif kind == "step" and (e["step"] % every == 0 or e["step"] in (1, steps) or e["skipped"]):
            if e["skipped"]:
                print(f"step {e['step']:>5}/{steps}  non-finite loss or gradient: update skipped")
            else:
                print(
                    f"step {e['step']:>5}/{steps}  loss {e['loss']:.4f}  lr {e['lr']:.2e}  gnorm {e['grad_norm']:.3f}"
                    f"  {e['tokens_per_s']:.0f} tok/s  peak {e['peak_memory_mb']:.0f} MB"
                    + (f"  margin {e['margin']:.3f}  acc {e['accuracy']:.2f}" if "margin" in e else "")
                    + (f"  step acc {e['step_accuracy']:.2f}" if "step_accuracy" in e else "")
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
                f"reference log-probs (the starting model, once per run): {e['done']}/{e['pairs']} pairs, {e['elapsed_s']:.0f} s"
            )
        elif kind == "reference":
            print(f"reference log-probs {e['status']} for {e['pairs']} pairs: {e['path']}")
        elif kind == "progress":
            print(e["message"])
        elif kind == "round":  # RFT: one round's sampling
            hinted = (f"; {e['hinted']} prompts hinted, {e['hint_kept']} of their {e['hint_samples']} samples kept"
                      if "hinted" in e else "")  # fmt: skip
            print(f"round {e['round']}: kept {e['kept']} of {e['samples']} samples ({e['kept_share']:.1%}), "
                  f"pass@N {e['pass_at_n']:.1%} over {e['prompts']} prompts{hinted}")  # fmt: skip
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
    if "val_step_accuracy" in e:  # a process reward model
        parts.append(f"step acc {e['val_step_accuracy']:.3f}")
    if "val_first_error_accuracy" in e:
        parts.append(f"first-error acc {e['val_first_error_accuracy']:.3f}")
    if "val_auc" in e:
        parts.append(f"AUC {e['val_auc']:.3f}")
    if "val_prompts" in e:
        parts.append(f"({e['val_prompts']} prompts, greedy)")
    if "regression_accuracy" in e:
        parts.append(f"regression acc {e['regression_accuracy']:.1f}%")
    if "regression_kl" in e:
        parts.append(f"KL to base {e['regression_kl']:.4f}")
    return "  ".join(parts)


def run(args) -> int:
    from mlxpt.runs.signals import exit_on_signal_after_stop

    if getattr(args, "ranks", None) is not None:
        return _launch(args.ranks)
    with exit_on_signal_after_stop():  # the process ends when a stopped run returns: a second signal exits 130
        code = _run(args)
    from mlxpt.train import distributed

    return distributed.leave(code)  # a rank of several exits at once, before mlx.launch stops it


def _launch(ranks: int) -> int:
    """`--ranks N`: this command line, less --ranks, on N ranks through mlx.launch
    (docs/distributed.md). mlx.launch exits 0 whatever its ranks did, so the exit status is read
    from its per-rank report lines: rank 0's own failure, else the first other rank's.

    The launcher runs in a session of its own, so a stop signal reaches it once, from here:
    SIGINT, SIGTERM and SIGHUP to this process (Ctrl-C, `kill`, a closed terminal) are passed on
    (mlxpt/launch.py passes them to the ranks); the first stops the ranks at a checkpoint, the
    second ends them at once."""
    import os
    import re
    import signal
    import subprocess

    from mlxpt.runs.signals import STOP_SIGNALS
    from mlxpt.train.distributed import launch_command

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--ranks="):
            skip = False
            continue
        skip = a == "--ranks"
        if not skip:
            argv.append(a)
    cmd = launch_command(ranks, argv)
    sys.stdout.flush()
    stops: list[int] = []  # every stop signal received
    early: list[int] = []  # those received before the launcher was started: passed on once it is
    launcher: list[subprocess.Popen] = []

    def pass_on(signum: int, frame: object) -> None:
        stops.append(signum)
        if not launcher:
            early.append(signum)
            return
        try:
            os.kill(launcher[0].pid, signum)
        except ProcessLookupError:  # it has ended: nothing left to stop
            pass

    old = {s: signal.signal(s, pass_on) for s in STOP_SIGNALS}
    codes: dict[int, int] = {}
    try:
        proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1, start_new_session=True
        )
        launcher.append(proc)  # from here the handler passes signals on itself
        while early:
            pass_on(early.pop(0), None)
        for line in proc.stderr:
            sys.stderr.write(line)
            if m := re.search(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)", line):
                codes[int(m.group(1))] = int(m.group(2)) if m.group(2) else 1
        status = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stops and not any(c > 0 for c in codes.values()):  # the ranks died of it, before their handlers
        name = signal.Signals(stops[0]).name
        print(f"interrupted ({name}) before training started: nothing new was saved", file=sys.stderr)
    return ranks_status(codes, status, stopped=bool(stops))


def ranks_status(codes: dict[int, int], launcher: int, stopped: bool = False) -> int:
    """The exit status of a `--ranks` run from the ranks' statuses: a rank's own failure (a
    positive status: 1, 3, 130), rank 0's first, over a rank the launcher then killed (negative:
    mlx.launch terminates the others once one fails); 130 if a stop signal was passed on and
    nothing failed on its own (a rank or the launcher ended by that signal); 1 if ranks or the
    launcher were only killed (a status the exit-code table knows, not 256 minus the signal)."""
    own = [codes[r] for r in sorted(codes, key=lambda r: (r != 0, r)) if codes[r] > 0]
    if own:
        return own[0]
    if stopped and (launcher != 0 or any(codes.values())):
        return EXIT_INTERRUPTED
    return 1 if any(codes.values()) or launcher < 0 else launcher


def ignored_settings_line(cfg) -> str | None:
    """A warning for adapter settings set (flag or YAML) that the fine-tune type ignores, such as
    `--fine-tune-type prefix --rank 16`; None when there are none. With --from the type is the
    adapter's own (taken when the run starts), so nothing is said."""
    adapter = getattr(cfg, "adapter", None)
    if not isinstance(adapter, config.AdapterConfig) or adapter.from_run:
        return None
    kind, default = adapter.fine_tune_type, config.AdapterConfig()
    given = [n for n in config.ignored_adapter_settings(kind) if getattr(adapter, n) != getattr(default, n)]
    if not given:
        return None
    reads = [n for n in config.adapter_settings(kind) if n not in ("fine_tune_type", "from_run")]
    return (
        f"{', '.join(f'{n}={getattr(adapter, n)}' for n in given)} ignored by fine_tune_type {kind} "
        f"(it reads {', '.join(reads)}); drop {'it' if len(given) == 1 else 'them'}"
    )


def _run(args) -> int:
    method, cfg = config_from_args(args)
    from mlxpt.train import distributed

    if not args.resume and distributed.launch_rank() == 0 and (line := ignored_settings_line(cfg)):
        print(f"warning: {line}", file=sys.stderr)  # once, not once a rank
    from mlxpt.train.methods import run_method
    from mlxpt.train.runner import resume_command

    emit = _printer(args.events, cfg.train.steps)
    run_dir, outcome = run_method(method, cfg, resume_dir=args.resume, emit=emit)
    if not distributed.is_main():  # rank 0 prints for every rank
        return EXIT_INTERRUPTED if outcome == "interrupted" else 0
    if outcome == "interrupted":
        from mlxpt.runs import latest_checkpoint

        if latest_checkpoint(run_dir) is None:
            what = "interrupted before the first step, nothing to save; the resume starts at step 0"
            print(f"{what}. Resume with: {resume_command(run_dir)}", file=sys.stderr)
        else:
            print(f"interrupted: checkpoint saved. Resume with: {resume_command(run_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.events == "text" and method == "prm":
        print(f"done: process reward model saved in {run_dir}")
        print(
            f"use it: from mlxpt.decode.prm import load_process_reward_model; load_process_reward_model('{run_dir}').score_steps(prompt, steps)"
        )
    elif args.events == "text" and method == "rm":
        print(f"done: reward model saved in {run_dir}")
        print(
            f"use it: from mlxpt.decode.reward_model import load_reward_model; load_reward_model('{run_dir}').score(prompt, response)"
        )
    elif args.events == "text":
        print(f"done: adapter saved in {run_dir}")
        print(f'try it: mlxpt generate --adapter {run_dir} --prompt "..."')
    return 0
