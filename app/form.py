"""The New run form's model: fields from the config dataclasses, values -> a validated config
and the `mlxpt train` argv that reproduces it. `mlxpt.config.build_config` checks the values, as
it does for `mlxpt train`, so the form and the command line accept exactly the same settings.
No Textual here."""

from __future__ import annotations

from dataclasses import dataclass

from mlxpt.config import METHODS, build_config, ignored_adapter_settings, section_fields, section_names
from mlxpt.errors import MlxptError


@dataclass(frozen=True)
class FormField:
    section: str
    name: str
    kind: str  # "bool" | "choice" | "text"
    default: object
    help: str
    choices: tuple = ()


def methods() -> tuple[str, ...]:
    """The methods `mlxpt train` knows."""
    return tuple(METHODS)


def data_kind(method: str) -> str | None:
    """What a method's training data holds: sft rows, preference pairs or prompts (None: unknown)."""
    from mlxpt.data.check import data_kind as kind_of

    return kind_of(method) if method in METHODS else None


def default_config(method: str):
    """The config `mlxpt train <method>` starts from (method presets applied)."""
    return build_config(method, {})


def form_fields(method: str) -> list[FormField]:
    cfg = default_config(method)
    out = []
    for section in section_names(cfg):
        obj = getattr(cfg, section)
        for f in section_fields(cfg, section):
            value = getattr(obj, f.name)
            kind = str(f.type)
            choices = tuple(f.metadata.get("choices") or ())
            out.append(
                FormField(
                    section,
                    f.name,
                    "bool" if kind.startswith("bool") else "choice" if choices else "text",
                    value,
                    f.metadata.get("help", ""),
                    choices,
                )
            )
    return out


def hidden_fields(method: str, values: dict[str, object]) -> tuple[str, ...]:
    """The settings the chosen fine-tune type ignores (rank for a prefix, ...), RFT's step-search
    settings under `strategy sample`, its hint unless it rationalizes, and its rationalization
    under a step search: hidden in the form and left out of its command; what was
    typed in them stays in the form for a switch back."""
    from mlxpt.config.rft import SEARCH_SETTINGS

    defaults = {f.name: f.default for f in form_fields(method)}
    hidden: list[str] = []
    if "fine_tune_type" in defaults:
        kind = values.get("fine_tune_type") or defaults["fine_tune_type"]
        hidden += [n for n in ignored_adapter_settings(str(kind)) if n in defaults]
    if method == "rft" and (values.get("strategy") or defaults.get("strategy")) == "sample":
        hidden += [n for n in SEARCH_SETTINGS if n in defaults]
        if not values.get("rationalize", defaults.get("rationalize")):
            hidden += [n for n in ("hint",) if n in defaults]
    elif method == "rft":  # a step search: rationalization samples, so neither applies
        hidden += [n for n in ("rationalize", "hint") if n in defaults]
    return tuple(hidden)


def changed_flags(method: str, values: dict[str, object]) -> dict[str, object]:
    """The values that differ from the method's defaults (what the argv must carry), less the
    settings the chosen fine-tune type ignores."""
    defaults = {f.name: f.default for f in form_fields(method)}
    hidden = hidden_fields(method, values)
    out = {}
    for name, value in values.items():
        if name not in defaults or name in hidden:
            continue
        default = defaults[name]
        if isinstance(default, bool) or isinstance(value, bool):
            if bool(value) != bool(default):
                out[name] = bool(value)
            continue
        text = "" if value is None else str(value).strip()
        if text == ("" if default is None else str(default)):
            continue
        out[name] = text if text else None
    return out


def validate(method: str, values: dict[str, object]):
    """(config, None) or (None, one-line error) for the form's values: `build_config`'s checks and
    then the refusals `mlxpt train` makes before it reads anything (check_before_reading)."""
    flags = {k: v for k, v in changed_flags(method, values).items() if v is not None}
    try:
        cfg = build_config(method, flags)
        check_before_reading(method, cfg)
    except MlxptError as e:
        return None, e.line()
    return cfg, None


def check_before_reading(method: str, cfg) -> None:
    """What the training runner refuses before any data or weights are read, in its order: the
    method's own check (distill's teacher, E740; RFT's rewards; ...), the run name and the runs
    folder. The form shows these beside Start instead of a child that dies at once."""
    from mlxpt.runs import check_run_name
    from mlxpt.runs.guards import check_writable
    from mlxpt.train.methods import METHODS as RUNNERS

    runner = RUNNERS[method]
    if runner.check is not None:
        runner.check(cfg, None)
    check_run_name(cfg.train.name or runner.name)
    check_writable(cfg.train.runs_dir, "--runs-dir", folder=True)


def to_argv(method: str, values: dict[str, object]) -> list[str]:
    """`train <method> --flag value ...` for the values that differ from the defaults: a switch
    turned off is `--no-flag` (the CLI's BooleanOptionalAction), and a value that starts with '-'
    is `--flag=-x`, which argparse would otherwise take for an option."""
    argv = ["train", method]
    for name, value in changed_flags(method, values).items():
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append(f"--no-{flag[2:]}")
        elif value is not None:
            text = str(value)
            argv += [f"{flag}={text}"] if text.startswith("-") else [flag, text]
    return [*argv, "--events", "json"]


def values_from_run_config(config: dict) -> dict[str, object]:
    """Flat field values from a run's config.json (duplicate-as-new): its settings sections only."""
    method = str(config.get("method", "sft"))
    sections = section_names(default_config(method)) if method in methods() else []
    out: dict[str, object] = {}
    for sec in sections:
        if isinstance(config.get(sec), dict):
            out.update(config[sec])
    return out


def has_field(method: str, name: str) -> bool:
    """Whether the method's form has this setting (`from_run` arrived with chaining)."""
    return any(f.name == name for f in form_fields(method))


def continue_values(config: dict, run_dir) -> dict[str, object]:
    """Form values that continue from a run: its adapter (`from_run`) on its own base model. The
    adapter's shape (rank, layers...) is taken from the adapter itself when the run starts."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    out: dict[str, object] = {k: model[k] for k in ("model", "quantize", "trust_remote_code") if k in model}
    adapter = config.get("adapter") if isinstance(config.get("adapter"), dict) else {}
    if adapter.get("fine_tune_type"):  # the form then shows that type's settings (it is taken anyway)
        out["fine_tune_type"] = adapter["fine_tune_type"]
    out["from_run"] = str(run_dir)
    return out
