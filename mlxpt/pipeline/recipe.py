"""A pipeline recipe: a name, settings shared by every training stage, and a list of stages.

    name: demo
    settings: {model: smollm2-135m, regression_data: none}
    stages:
      - {method: sft, data: ../sft, steps: 60, learning_rate: 5e-4}
      - {method: dpo, data: ../pref, steps: 25}
      - {method: eval, data: [../sft/test.jsonl, ../ood/test.jsonl], limit: 20}

`load_recipe` reads the YAML (file:line for every key) and checks its shape; `plan_recipe`
builds every training stage's config with `build_config` and reads every data file (rows
validated) and every eval set, so a bad stage 3 is refused before stage 1 trains. Relative paths
in a recipe are relative to the recipe file's folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlxpt.config import ASSETS, DEFAULT_MODEL, SFTConfig, all_fields, apply_flat, build_config, config_class, flatten
from mlxpt.errors import ConfigError, DataError, MlxptError

TRAIN_METHODS = ("sft", "dpo", "simpo", "orpo", "grpo")
KINDS = (*TRAIN_METHODS, "eval")
TOP_KEYS = ("name", "description", "settings", "stages")
PATH_KEYS = ("data", "valid", "replay", "regression_data", "from_run")
EVAL_KEYS = ("data", "limit", "max_tokens", "greedy_batch", "extract", "strategies")
EVAL_DEFAULT_DATA = (str(ASSETS / "sft" / "test.jsonl"), str(ASSETS / "ood" / "test.jsonl"))
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,45}$")


@dataclass
class Stage:
    """One stage: a training method with its own settings, or `eval`."""

    index: int  # 1-based, as users count
    kind: str  # one of KINDS
    settings: dict  # the stage's own keys, `method` removed, paths resolved
    line: int  # where the stage starts in the recipe
    key_lines: dict[str, int] = field(default_factory=dict)
    flags: dict = field(default_factory=dict)  # training: shared + own settings, as build_config flags
    cfg: object = None  # training: the checked config (without from_run where the pipeline sets it)
    chained: bool = False  # starts from the previous training stage's run

    @property
    def is_training(self) -> bool:
        return self.kind != "eval"


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    settings: dict  # shared by every training stage (paths resolved)
    setting_lines: dict[str, int]
    stages: list[Stage]
    content: dict  # the mapping as written, kept in pipeline.json
    digest: str  # of `content` and its resolved paths: the same recipe finds its pipeline folder again

    def where(self, line: int, stage: Stage | None = None) -> str:
        return f"{self.path}:{line}" + (f", stage {stage.index} ({stage.kind})" if stage else "")


def _err(code: str, what: str, where: str, hint: str | None = None) -> ConfigError:
    return ConfigError(code, what, where, hint)


def _read_yaml(path: Path) -> tuple[object, dict]:
    """(data, lines): the parsed YAML and, for every mapping key, its line (keyed by the key path
    as a tuple: ("stages", 1, "steps")). A key given twice is refused with its line."""
    import yaml

    if not path.is_file():
        raise _err("E800", "recipe file not found", str(path), "give the path of a pipeline recipe (.yaml)")
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            lines: dict = {}
            if node is not None:
                _walk(node, (), lines, path)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise _err("E801", f"invalid YAML: {getattr(e, 'problem', None) or e}", where, "fix the YAML syntax") from None
    return data, lines


def _walk(node, at: tuple, lines: dict, path: Path) -> None:
    import yaml

    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a mapping or list"
                raise _err(
                    "E801", f"key {shown!r} is not read as a name (YAML reads it as {key_node.tag.rsplit(':', 1)[-1]})",
                    f"{path}:{key_node.start_mark.line + 1}", "quote it, or use the setting's name",
                )  # fmt: skip
            key = key_node.value
            if key in seen:
                raise _err(
                    "E801", f"duplicate key {key!r}", f"{path}:{key_node.start_mark.line + 1}", "give each key once"
                )
            seen.add(key)
            _walk(value_node, (*at, key), lines, path)
            lines[(*at, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*at, i), lines, path)


def recipe_digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe and check its shape (keys, methods, settings are mappings); no config built yet."""
    path = Path(path)
    data, lines = _read_yaml(path)
    top = str(path)
    if not isinstance(data, dict):
        raise _err("E802", "a recipe must be a mapping with name, settings and stages", top, "see docs/pipeline.md")
    for key in data:
        if key not in TOP_KEYS:
            raise _err(
                "E802", f"unknown recipe key {key!r}", f"{path}:{lines[(key,)]}", f"the keys are {', '.join(TOP_KEYS)}"
            )
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        where = f"{path}:{lines.get(('name',), 1)}"
        raise _err(
            "E802", f"recipe name {name!r} is missing or invalid", where,
            "give `name:` up to 46 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )  # fmt: skip
    shared = data.get("settings") or {}
    if not isinstance(shared, dict):
        raise _err("E802", "settings must be a mapping of setting: value", f"{path}:{lines[('settings',)]}")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        where = f"{path}:{lines.get(('stages',), 1)}"
        raise _err(
            "E802", "a recipe needs a non-empty list of stages", where, "add `stages:` with `- method: sft` items"
        )
    base = path.resolve().parent
    setting_lines = _flat_lines(shared, lines, ("settings",))
    recipe = Recipe(
        path, name, str(data.get("description") or ""), _resolve(flatten(shared), base), setting_lines, [],
        data, "",
    )  # fmt: skip
    for i, raw in enumerate(stages_raw):
        line = lines.get(("stages", i), 1)
        if not isinstance(raw, dict):
            raise _err(
                "E803", f"stage {i + 1} is not a mapping", f"{path}:{line}", "write `- method: sft` and its settings"
            )
        kind = raw.get("method")
        if kind == "rm":
            raise _err(
                "E803", "a reward model is not a stage of a pipeline (it trains a scorer, not the model)",
                f"{path}:{lines.get(('stages', i, 'method'), line)}", "train it with `mlxpt train rm` on its own",
            )  # fmt: skip
        if kind not in KINDS:
            raise _err(
                "E803", f"stage {i + 1} has method {kind!r}", f"{path}:{lines.get(('stages', i, 'method'), line)}",
                f"use one of {', '.join(KINDS)}",
            )  # fmt: skip
        own = {k: v for k, v in raw.items() if k != "method"}
        key_lines = _flat_lines(own, lines, ("stages", i))
        recipe.stages.append(Stage(i + 1, kind, _resolve(flatten(own), base), line, key_lines))
    # the same text in another folder reads other data: the paths it resolves to count too
    resolved = {"settings": recipe.settings, "stages": [s.settings for s in recipe.stages]}
    recipe.digest = recipe_digest({"recipe": data, "resolved": resolved})
    return recipe


def _flat_lines(mapping: dict, lines: dict, at: tuple) -> dict[str, int]:
    """Key -> line for a flat or section-grouped mapping (`train: {steps: 3}` gives steps' line)."""
    out = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            out.update({kk: lines.get((*at, k, kk), lines.get((*at, k), 1)) for kk in v})
        out.setdefault(k, lines.get((*at, k), 1))
    return out


def _resolve(settings: dict, base: Path) -> dict:
    """Relative data paths (and model folders, reward files) read against the recipe's folder."""

    def at_base(v):
        return v if not isinstance(v, str) or Path(v).expanduser().is_absolute() else str(base / Path(v).expanduser())

    out = dict(settings)
    for key in PATH_KEYS:
        v = out.get(key)
        if isinstance(v, list):  # an eval stage's data sets
            out[key] = [at_base(p) for p in v]
        elif isinstance(v, str) and v and not (key == "regression_data" and v.lower() in ("general", "none", "off")):
            out[key] = at_base(v)
    model = out.get("model")
    if isinstance(model, str) and not Path(model).is_absolute() and (base / model).exists():
        out["model"] = str(base / model)
    if isinstance(out.get("rewards"), str):  # path/file.py:function items
        parts = []
        for item in out["rewards"].split(","):
            file, _, fn = item.strip().rpartition(":")
            parts.append(f"{base / file}:{fn}" if file.endswith(".py") and (base / file).is_file() else item.strip())
        out["rewards"] = ",".join(parts)
    return out


def plan_recipe(recipe: Recipe) -> Recipe:
    """Check the whole recipe before anything trains: every training stage's config (built with
    `build_config`), its data files read and validated, every eval set read. Raises one line
    naming the stage and its key's file:line; returns the recipe with `cfg`/`flags` filled in."""
    training = [s for s in recipe.stages if s.is_training]
    _check_shared(recipe, training)
    for n, stage in enumerate(training):
        stage.chained = n > 0
        _plan_training(recipe, stage)
        first = training[0].cfg.model.model
        if stage.cfg.model.model != first:
            raise _err(
                "E804", f"stage {stage.index} trains model {stage.cfg.model.model!r}, stage {training[0].index} {first!r}",
                recipe.where(stage.key_lines.get("model", stage.line), stage),
                "a pipeline trains one model: set `model` once under `settings`",
            )  # fmt: skip
    for stage in recipe.stages:
        if not stage.is_training:
            _plan_eval(recipe, stage)
    return recipe


def _check_shared(recipe: Recipe, training: list[Stage]) -> None:
    """Every shared setting is a setting of some stage's method (a typo is not silently unused)."""
    kinds = {s.kind for s in training}
    model_keys = {"model", "quantize", "trust_remote_code"}
    for key in recipe.settings:
        line = recipe.setting_lines.get(key, 1)
        if key in ("runs_dir",):
            raise _err(
                "E804",
                "runs_dir is not a recipe setting",
                f"{recipe.path}:{line}",
                "give --runs-dir to `mlxpt pipeline`",
            )
        if key == "from_run" and training:
            raise _err(
                "E804", "from_run is set by the pipeline for chained stages", f"{recipe.path}:{line}",
                "put it on the first training stage to start that stage from another run",
            )  # fmt: skip
        if key in model_keys or any(key in all_fields(config_class(k)()) for k in kinds):
            continue
        owners = [m for m in TRAIN_METHODS if key in all_fields(config_class(m)())]
        if not owners:  # a setting of no method: E504, with the nearest names
            apply_flat(SFTConfig(), {key: recipe.settings[key]}, source=f"{recipe.path}:{line}")
        raise _err(
            "E804", f"shared setting {key!r} is for {', '.join(owners)}, and no stage of this recipe trains with it",
            f"{recipe.path}:{line}", "move it into the stage that uses it, or drop it",
        )  # fmt: skip


def _plan_training(recipe: Recipe, stage: Stage) -> None:
    from mlxpt.runs import check_run_name
    from mlxpt.train.methods import METHODS
    from mlxpt.train.regression import load_probe

    fields = all_fields(config_class(stage.kind)())
    shared = {k: v for k, v in recipe.settings.items() if k in fields}
    for key in ("runs_dir",) + (("from_run",) if stage.chained else ()):
        if key in stage.settings:
            hint = (
                "give --runs-dir to `mlxpt pipeline`"
                if key == "runs_dir"
                else "only a recipe's first training stage may set it"
            )
            raise _err("E804", f"{key} is set by the pipeline", recipe.where(stage.key_lines[key], stage), hint)
    # each key on its own first, so an error names the key's own line
    cfg = build_config(stage.kind, {})
    for source, settings, lines in (
        ("settings", shared, recipe.setting_lines),
        ("stage", stage.settings, stage.key_lines),
    ):
        for key, value in settings.items():
            where = f"{recipe.path}:{lines.get(key, stage.line)}" + (
                f", stage {stage.index} ({stage.kind})" if source == "stage" else f", shared by stage {stage.index}"
            )
            apply_flat(cfg, {key: value}, source=where)
    stage.flags = {**shared, **stage.settings}
    stage.flags.setdefault("name", f"{recipe.name}-{stage.index}-{stage.kind}")
    try:
        stage.cfg = build_config(stage.kind, stage.flags)
        check_run_name(stage.cfg.train.name)
    except MlxptError as e:
        e.where = recipe.where(stage.line, stage)
        raise
    cfg = stage.cfg
    for key, value in (
        ("data", cfg.data.data),
        ("valid", cfg.data.valid),
        ("replay", getattr(getattr(cfg, "reg", None), "replay", None)),
    ):
        if value and not Path(value).exists():
            raise DataError(
                "E805", f"{key} not found: {value}", recipe.where(stage.key_lines.get(key, stage.line), stage),
                "fix the path (relative paths are relative to the recipe file)",
            )  # fmt: skip
    method = METHODS[stage.kind]
    try:
        if method.check is not None:
            method.check(cfg, None)
        method.read(cfg)  # every row validated now, not after the stages before it have trained
        load_probe(cfg.train.regression_data, cfg.train.regression_rows)
    except DataError:
        raise  # its where is the data file's line: the place to fix
    except MlxptError as e:
        e.where = recipe.where(stage.line, stage) + (f"; {e.where}" if e.where else "")
        raise


def _plan_eval(recipe: Recipe, stage: Stage) -> None:
    from mlxpt.decode.evaluate import read_rows

    s = stage.settings
    for key in s:
        if key not in EVAL_KEYS:
            raise _err(
                "E806", f"unknown eval setting {key!r}", recipe.where(stage.key_lines.get(key, stage.line), stage),
                f"an eval stage takes {', '.join(EVAL_KEYS)}",
            )  # fmt: skip
    data = s.get("data", list(EVAL_DEFAULT_DATA))
    data = [data] if isinstance(data, str) else data
    line = recipe.where(stage.key_lines.get("data", stage.line), stage)
    if not isinstance(data, list) or not data or not all(isinstance(p, str) for p in data):
        raise _err("E806", "eval data must be a file or a list of files", line, "data: [test.jsonl, ood.jsonl]")
    strategies = s.get("strategies", ["greedy"])
    if strategies not in ("greedy", ["greedy"]):
        raise _err(
            "E806", f"eval strategies {strategies!r}: a pipeline scores greedy answers only",
            recipe.where(stage.key_lines.get("strategies", stage.line), stage),
            "drop `strategies`; use `mlxpt eval` for sampled strategies",
        )  # fmt: skip
    out = {"data": data, "strategies": ["greedy"]}
    for key, default, low in (("limit", None, 1), ("max_tokens", 96, 1), ("greedy_batch", 16, 1)):
        v = s.get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise _err(
                "E806", f"{key}={v!r} is not a whole number >= {low}",
                recipe.where(stage.key_lines.get(key, stage.line), stage),
            )  # fmt: skip
        out[key] = v
    out["extract"] = str(s.get("extract", "auto"))
    for p in data:
        try:
            read_rows(p, out["limit"])
        except DataError as e:
            if e.code == "E623":
                e.where = f"{p}; {line}"
            raise
    stage.settings = out


def base_model(recipe: Recipe) -> tuple[str, str]:
    """(model, quantize) every stage starts from: the training stages' model, else the shared one."""
    for stage in recipe.stages:
        if stage.cfg is not None:
            return stage.cfg.model.model, stage.cfg.model.quantize
    return str(recipe.settings.get("model", DEFAULT_MODEL)), str(recipe.settings.get("quantize", "auto"))
