"""A model card for a fused run, and the upload of the fused folder to the Hugging Face Hub.

The card (README.md with YAML front matter) is built from what the run recorded: its config
(base model, method, adapter, data, steps), its metrics.jsonl and status.json, and the fuse and
GGUF checks. The network is touched only by `upload`, and only when `--upload-repo` is given
without `--dry-run`; any failure there is one line, and the local folder stays.
"""

from __future__ import annotations

from pathlib import Path

from mlxpt.errors import MlxptError, ResourceError

# Hub ids and licences of the bundled aliases (the GGUF metadata has neither)
KNOWN_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
SKIP = (".mlxpt-output",)  # mlxpt's own marker never leaves the machine


def _run_folder(run: str | Path) -> Path | None:
    p = Path(run)
    for folder in (p, p.parent, p.parent.parent):
        if (folder / "config.json").is_file() and ((folder / "metrics.jsonl").is_file() or folder == p):
            return folder
    return None


def _license_of(ref: str) -> str:
    if ref in KNOWN_BASES:
        return KNOWN_BASES[ref][1]
    readme = Path(ref) / "README.md"
    if readme.is_file():  # a local HF folder keeps the licence in its card's front matter
        parts = readme.read_text(encoding="utf-8", errors="replace").split("---")
        for line in parts[1].splitlines() if len(parts) > 2 else []:
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip() or "other"
    return "other"


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def model_card(run: str | Path, ref: str, repo: str, checks: dict[str, str]) -> str:
    """README.md text for the fused model of `run` on base `ref`; `checks` are verification lines."""
    from mlxpt.runs import read_config
    from mlxpt.runs.atomic import read_jsonl

    folder = _run_folder(run)
    cfg: dict = {}
    if folder is not None:
        try:
            cfg = read_config(folder)
        except MlxptError:
            cfg = {}
    # a local path stays on this machine: the card names only the folder
    base = KNOWN_BASES[ref][0] if ref in KNOWN_BASES else (Path(ref).name if Path(ref).exists() else ref)
    method = cfg.get("method", "sft")
    adapter = cfg.get("adapter") or {}
    kind = adapter.get("fine_tune_type", "lora")
    data = cfg.get("data") or {}
    train = cfg.get("train") or {}
    rows = read_jsonl(folder / "metrics.jsonl") if folder else []
    steps = [r for r in rows if isinstance(r, dict) and r.get("event") == "step" and "loss" in r]
    evals = [r for r in rows if isinstance(r, dict) and r.get("event") == "eval" and "val_loss" in r]
    status: dict = {}
    if folder is not None and (folder / "status.json").is_file():
        import json

        try:
            status = json.loads((folder / "status.json").read_text(encoding="utf-8"))
        except ValueError:
            status = {}
    licence = _license_of(ref)
    base_line = f"base_model: {base}\n" if "/" in base else ""
    lines = [
        "---",
        f"{base_line}library_name: mlx\nlicense: {licence}",
        f"tags:\n- mlx\n- mlxpt\n- {kind}\n- {method}",
        "---",
        "",
        f"# {repo.split('/')[-1]}",
        "",
        f"`{base}` fine-tuned with mlxpt ({method}, {kind}"
        + (f" rank {adapter['rank']} on {adapter.get('num_layers', 'all')} layers" if "rank" in adapter else "")
        + "), adapter merged into the weights.",
        "",
        "## Training",
        "",
        f"- base model: {base}",
        f"- method: {method}; adapter: {kind}; steps: {train.get('steps', status.get('steps', '?'))}; "
        f"learning rate: {train.get('learning_rate', '?')}",
        f"- data: {Path(str(data['data'])).name if data.get('data') else 'not recorded'}"
        + (f" ({(cfg.get('data_report') or {}).get('train', {}).get('kept')} training rows)"
           if (cfg.get("data_report") or {}).get("train") else ""),
        "",
        "## Metrics",
        "",
    ]  # fmt: skip
    if steps:
        lines.append(f"- final training loss: {_fmt(steps[-1]['loss'])} (step {steps[-1].get('step')})")
    if evals:
        lines.append(f"- final validation loss: {_fmt(evals[-1]['val_loss'])} (step {evals[-1].get('step')})")
    if status.get("best_val_loss") is not None:
        lines.append(f"- best validation loss: {_fmt(status['best_val_loss'])}")
    if not (steps or evals):
        lines.append("- none recorded")
    lines += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in checks.items()]
    lines += ["", "## Use", "", "```", f"mlx_lm.generate --model {repo} --prompt 'Hello'", "```"]
    if licence == "other":
        lines += ["", "The base model's licence was not recorded: check it before sharing."]
    return "\n".join(lines) + "\n"


def files_to_upload(folder: Path) -> list[str]:
    """The files `upload` pushes, relative to `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in SKIP)


def upload(folder: Path, repo: str) -> str:
    """Create `repo` (private if new) and push `folder`; returns the commit URL."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True, private=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, ignore_patterns=list(SKIP))
    except Exception as e:  # noqa: BLE001 - offline, no token, no rights: huggingface-hub raises many types
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        raise ResourceError(
            "E681", f"cannot upload to the Hub ({type(e).__name__}: {msg})", repo,
            f"check the network and `hf auth login` (or HF_TOKEN); the fused folder is kept at {folder}",
        ) from None  # fmt: skip
    return str(getattr(info, "commit_url", info))
