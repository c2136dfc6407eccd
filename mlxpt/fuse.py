"""Merge a run's LoRA/DoRA adapter into the base weights, and prove the merge is exact.

Reference logits of base+adapter on a fixed probe are compared with the logits of the fused
model reloaded from disk; the folder appears at `--out` only when they agree. A float32 base must
agree to 1e-4 x the logit scale; a bfloat16/float16 base stores W + ΔW rounded to that dtype, so it
gets the looser DTYPE_TOL; a base kept quantised is re-quantised after fusing, which rounds W + ΔW
to the quantisation grid, so it gets the looser QUANTIZED_TOL.

With an `ExportConfig` the same folder also gets a GGUF file (read back and compared, see
`verify_gguf`), an Ollama Modelfile and a model card, all before it is renamed into
place; the Hub upload comes last, from the finished folder.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlxpt.errors import ConfigError, MlxptError, NumericsError
from mlxpt.runs.guards import check_output, write_marker

FLOAT_TOL = 1e-4  # max |Δlogit| / max(1, max |logit|) for a float32 fused model
# W + ΔW stored in a 16-bit float is rounded to its unit roundoff u (bfloat16 2^-8, float16 2^-11),
# and both models round their activations too. Measured, fused vs base+adapter, LoRA and DoRA:
# tiny model bf16 0.015-0.023 (4-6 u), f16 0.0020-0.0026 (4-5 u); SmolLM2-135M with a 10-step SFT
# adapter bf16 0.025 (6 u), f16 0.0045 (9 u). The adapter's scale doubled: 0.7-1.2 (tiny), 0.18.
DTYPE_TOL = {"float32": FLOAT_TOL, "float16": 0.015, "bfloat16": 0.06}
# Re-quantising W + ΔW moves weights to new grid points. Measured on the tiny test model with a
# large random adapter: 8-bit 0.019 and 4-bit 0.27 of the logit scale. --dequantize stays exact.
QUANTIZED_TOL = {8: 0.1, 6: 0.2, 5: 0.4, 4: 0.5}
PROBE_MESSAGE = [{"role": "user", "content": "Name three primary colours and say why the sky is blue."}]
FORMATS = ("gguf",)
GGUF_TYPES = ("f16", "q8_0")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass
class ExportConfig:
    export: str | None = None  # "gguf": write a GGUF file into the fused folder
    gguf_type: str | None = None  # f16 | q8_0 (default f16)
    ollama: bool = False  # write an Ollama Modelfile beside the GGUF
    upload_repo: str | None = None  # owner/name on the Hub: write a model card and push the folder
    dry_run: bool = False  # with upload_repo: write the folder and card, list the files, push nothing

    def check(self) -> ExportConfig:
        """Refuse unknown values and flags without their partner; returns self with defaults set."""
        if self.export is not None and self.export not in FORMATS:
            raise ConfigError(
                "E643", f"unknown export format {self.export!r}", "--export", f"use one of: {', '.join(FORMATS)}"
            )
        if self.gguf_type is not None and self.gguf_type not in GGUF_TYPES:
            raise ConfigError(
                "E644", f"unknown GGUF type {self.gguf_type!r}", "--gguf-type", f"use one of: {', '.join(GGUF_TYPES)}"
            )
        for flag, given in (("--gguf-type", self.gguf_type is not None), ("--ollama", self.ollama)):
            if given and self.export != "gguf":
                raise ConfigError("E649", f"{flag} needs --export gguf", flag, "add --export gguf")
        if self.dry_run and not self.upload_repo:
            raise ConfigError("E649", "--dry-run needs --upload-repo", "--dry-run", "add --upload-repo OWNER/NAME")
        if self.upload_repo is not None and not _REPO_ID.match(self.upload_repo):
            raise ConfigError(
                "E680", f"not a Hub repository id: {self.upload_repo!r}", "--upload-repo", "use OWNER/NAME"
            )
        if self.export == "gguf" and self.gguf_type is None:
            self.gguf_type = "f16"
        return self


@dataclass
class FuseReport:
    out: Path
    model: str
    fused_layers: int
    max_abs_diff: float  # reloaded fused model vs base+adapter, on the probe
    tolerance: float  # absolute tolerance the difference was held to
    quantized: bool  # the fused weights are stored quantised
    gguf: Path | None = None  # the exported GGUF file (inside `out`)
    gguf_diff: float = 0.0  # GGUF read back by mlxpt vs the fused model, max |Δlogit|
    gguf_tol: float = 0.0
    modelfile: Path | None = None
    upload_files: list[str] | None = None  # what was (or, with dry_run, would be) pushed
    upload_url: str | None = None


def base_model_of(run: str | Path) -> dict | None:
    """The `model` section of a run's config.json (run folder or a folder below it), or None; a
    relative model path is anchored where the run was started (see `read_config`)."""
    from mlxpt.runs import read_config

    p = Path(run)
    for folder in (p, p.parent, p.parent.parent):
        try:
            cfg = read_config(folder)
        except (OSError, MlxptError):
            continue
        section = cfg.get("model") if isinstance(cfg, dict) else None
        if isinstance(section, dict) and isinstance(section.get("model"), str):
            return section
    return None


def probe_tokens(tokenizer) -> list[int]:
    """A fixed token sequence: the chat template rendered for a fixed message, else its text."""
    from mlxpt.decode.generate import chat_prompt

    try:
        ids = chat_prompt(tokenizer, PROBE_MESSAGE)
    except MlxptError:
        ids = list(tokenizer.encode(PROBE_MESSAGE[0]["content"]))
    return ids[:256] or list(range(1, 33))


def logits_of(model, tokens: list[int]):
    """float32 logits (L, V) of one sequence, as NumPy."""
    import mlx.core as mx
    import numpy as np

    out = model(mx.array(tokens)[None]).astype(mx.float32)
    mx.eval(out)
    return np.array(out[0])


def fuse_layers(model, dequantize: bool = False) -> int:
    """Replace every adapter layer by its fused linear, in place; return how many."""
    from mlx.utils import tree_unflatten

    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def _quantization_of(model) -> dict | None:
    for _, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size") and "scales" in m:
            return {
                "group_size": m.group_size,
                "bits": m.bits,
                "mode": getattr(m, "mode", "affine"),
            }
    return None


def dtype_tol(model) -> float:
    """DTYPE_TOL of the least precise float dtype among the model's parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    return max((tol for name, tol in DTYPE_TOL.items() if getattr(mx, name) in dtypes), default=FLOAT_TOL)


def _save(folder: Path, model, tokenizer, config: dict, src: Path) -> None:
    from mlx_lm.utils import save_config, save_model

    save_model(folder, model)
    save_config(dict(config), config_path=folder / "config.json")
    tokenizer.save_pretrained(str(folder))
    if (src / "generation_config.json").is_file():  # never *.py: no remote code travels along
        shutil.copy(src / "generation_config.json", folder)


def _publish(tmp: Path, out: Path) -> None:
    from mlxpt.runs.atomic import fsync_dir

    old = None
    if out.exists():
        old = out.with_name(f".tmp-old-{out.name}-{secrets.token_hex(4)}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fuse(
    run: str | Path,
    out: str | Path,
    model: str | None = None,
    dequantize: bool = False,
    force: bool = False,
    quantize: str | None = None,
    trust_remote_code: bool = False,
    export: ExportConfig | None = None,
) -> FuseReport:
    """Fuse the adapter of `run` into its base model and write the verified result to `out`; with
    `export`, add a GGUF / Modelfile / model card to it and push it to the Hub."""
    import numpy as np

    from mlxpt.models.adapters import find_adapter, read_adapter_config
    from mlxpt.models.loader import check_folder, load, resolve
    from mlxpt.models.peft import refuse_fuse
    from mlxpt.runs.atomic import disk_full_error, is_disk_full

    out = Path(out)
    export = (export or ExportConfig()).check()
    check_output(out, {"run": run}, "fused model", force, existing=False)  # before anything is read
    refuse_fuse(read_adapter_config(find_adapter(run)), str(run))  # prefix / bottleneck adapters: nothing to merge
    section = base_model_of(run) or {}
    ref = model or section.get("model")
    if ref is None:
        raise ConfigError("E612", "no run config.json names the base model", str(run), "pass --model")
    quantize = quantize or section.get("quantize") or "auto"

    src = resolve(ref)
    check_output(out, {"run": run, "base model": src}, "fused model", force)
    config = check_folder(src, trust_remote_code)
    _check_export(export, config, src)
    net, tokenizer = load(ref, adapter=str(run), quantize=quantize, trust_remote_code=trust_remote_code)
    probe = probe_tokens(tokenizer)
    want = logits_of(net, probe)

    n = fuse_layers(net, dequantize)
    if dequantize:
        from mlx_lm.utils import dequantize_model

        net = dequantize_model(net)
    quant = _quantization_of(net)
    fused = logits_of(net, probe)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if quant:
        config["quantization"] = quant

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-fuse-{out.name}-{secrets.token_hex(4)}")
    try:
        _save(tmp, net, tokenizer, config, src)
        write_marker(tmp, "fused model")  # a later --force may replace this folder, and only this kind
        reloaded, _ = load(str(tmp), quantize="none")
        got = logits_of(reloaded, probe)
        scale = max(1.0, float(np.max(np.abs(want))))
        # What was written must reload to the model in memory, quantised or not.
        saved_diff = float(np.max(np.abs(got - fused)))
        if not saved_diff <= FLOAT_TOL * scale:  # also catches NaN
            raise NumericsError(
                "E613",
                f"the saved fused model reloads differently: max |Δlogit| = {saved_diff:.3g}",
                str(out),
                "nothing was written; report the model",
            )
        diff = float(np.max(np.abs(got - want)))
        tol = max(QUANTIZED_TOL.get(quant["bits"], 0.5) if quant else 0.0, dtype_tol(net)) * scale
        if not diff <= tol:
            raise NumericsError(
                "E614",
                f"fused model disagrees with base+adapter: max |Δlogit| = {diff:.3g} > {tol:.3g}",
                str(run),
                f"nothing was written; {'try --dequantize, or ' if quant else ''}report the model",
            )
        report = FuseReport(out, ref, n, diff, tol, quant is not None)
        _export(tmp, out, net, tokenizer, probe, export, report, run)
        _publish(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(out) from exc
        raise
    if export.upload_repo:
        from mlxpt.models.model_card import files_to_upload, upload

        report.upload_files = files_to_upload(out)
        if not export.dry_run:
            report.upload_url = upload(out, export.upload_repo)
    return report


def _check_export(export: ExportConfig, config: dict, src: Path) -> None:
    """Refuse an export that cannot succeed before any weight is read."""
    if export.export == "gguf":
        from mlxpt.models.gguf_write import chat_template_of, check_exportable, require_gguf, tokenizer_metadata

        require_gguf()
        check_exportable(config, str(src))
        if config.get("vocab_size"):
            tokenizer_metadata(src, int(config["vocab_size"]))
        if export.ollama:
            from mlxpt.models.gguf_write import check_chatml

            check_chatml(chat_template_of(src), str(src))


def _export(tmp: Path, out: Path, net, tokenizer, probe, export: ExportConfig, report: FuseReport, run) -> None:
    """Write the asked-for exports into the not-yet-published folder `tmp` (named for `out`)."""
    checks = {"fuse": f"reloaded fused model vs base+adapter max |Δlogit| = {report.max_abs_diff:.3g}"}
    if export.export == "gguf":
        from mlxpt.models.gguf_write import chat_template_of, write_gguf

        name = f"{out.name}-{export.gguf_type}.gguf"
        path = write_gguf(tmp, tmp / name, export.gguf_type, name=out.name)  # not the temp folder's name
        report.gguf_diff, report.gguf_tol = verify_gguf(path, net, tokenizer, export.gguf_type, probe)
        report.gguf = out / name
        checks["gguf"] = f"{name} read back vs fused model max |Δlogit| = {report.gguf_diff:.3g}"
        if export.ollama:
            from mlxpt.models.gguf_write import modelfile
            from mlxpt.runs.atomic import atomic_write_text

            stops = [t for t in (getattr(tokenizer, "eos_token", None),) if t]
            atomic_write_text(tmp / "Modelfile", modelfile(name, chat_template_of(tmp), stops))
            report.modelfile = out / "Modelfile"
    if export.upload_repo:
        from mlxpt.models.model_card import model_card
        from mlxpt.runs.atomic import atomic_write_text

        atomic_write_text(tmp / "README.md", model_card(run, report.model, export.upload_repo, checks))


def verify_gguf(path: Path, model, tokenizer, gguf_type: str, probe: list[int]) -> tuple[float, float]:
    """Read `path` back through mlxpt's GGUF loader and compare it with `model` on the probe and a
    few prompts: the same token ids, the same chat prompt, logits within GGUF_TOL. Returns
    (max |Δlogit|, tolerance); raises E647/E648 otherwise."""
    import secrets
    import shutil

    import mlx.core as mx
    import numpy as np

    from mlxpt.models.gguf import convert_gguf
    from mlxpt.models.gguf_write import GGUF_TOL, PROMPTS
    from mlxpt.models.loader import load

    scratch = path.parent.with_name(f".tmp-gguf-check-{secrets.token_hex(4)}")
    try:
        back, back_tok = load(str(convert_gguf(path, scratch)), quantize="none")
        back.set_dtype(mx.float32)  # an f16 file loads as float16: compare the file's weights, not fp16 math
        if probe_tokens(back_tok) != list(probe):  # the chat template (or its absence) travelled along
            raise NumericsError(
                "E648", "the GGUF's chat template renders a different prompt from the model's", str(path),
                "nothing was written; report the tokenizer",
            )  # fmt: skip
        diff = tol = 0.0
        for ids in [probe] + [list(tokenizer.encode(p)) for p in PROMPTS]:
            text = tokenizer.decode(ids)
            if list(back_tok.encode(text)) != list(tokenizer.encode(text)):
                raise NumericsError(
                    "E648", "the GGUF tokenizer splits text differently from the model's", str(path),
                    "nothing was written; report the tokenizer",
                )  # fmt: skip
            want = logits_of(model, ids)
            got = logits_of(back, ids)
            diff = max(diff, float(np.max(np.abs(got - want))))
            tol = max(tol, GGUF_TOL[gguf_type] * max(1.0, float(np.max(np.abs(want)))))
        if not diff <= tol:  # also catches NaN
            raise NumericsError(
                "E647", f"the GGUF reads back differently: max |Δlogit| = {diff:.3g} > {tol:.3g}", str(path),
                "nothing was written; report the model",
            )  # fmt: skip
        return diff, tol
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
