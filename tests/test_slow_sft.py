"""The main job on the real default model: a short LoRA SFT whose validation loss falls, then
generation with the adapter in the trained format (slow: about a minute or two on a CPU)."""

from __future__ import annotations

import re

import pytest

from mlxpt.config import SFTConfig, apply_flat

pytestmark = pytest.mark.slow


def test_default_sft_val_loss_falls_and_adapter_answers(tmp_path):
    from mlxpt.decode.generate import chat_prompt, generate_text
    from mlxpt.models import load
    from mlxpt.train.sft import run_sft

    cfg = SFTConfig()
    apply_flat(
        cfg,
        {
            "steps": 24,
            "learning_rate": 3e-4,
            "warmup_steps": 2,
            "eval_every": 24,
            "eval_batches": 6,
            "save_every": 24,
            "regression_data": "none",  # the monitor is tested on a tiny model (test_forgetting.py)
            "runs_dir": str(tmp_path / "runs"),
        },
        source="test",
    )
    events = []
    run_dir, outcome = run_sft(cfg, emit=events.append)
    assert outcome == "finished"
    vals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert len(vals) == 2 and vals[1] < 0.8 * vals[0], vals

    question = "Tom has 14 pencils. He buys 9 more and then gives 6 to Ana. How many pencils does Tom have now?"
    step = re.compile(r"^\d+ [-+*] \d+ = \d+$")  # the trained answer style: "14 + 9 = 23" lines
    answers = {}
    for adapter in (None, str(run_dir)):
        model, tok = load("smollm2-135m", adapter=adapter)
        prompt = chat_prompt(tok, [{"role": "user", "content": question}])
        answers[adapter] = generate_text(model, tok, prompt, max_tokens=40).strip()
    tuned, base = answers[str(run_dir)], answers[None]
    assert step.match(tuned.splitlines()[0]), tuned
    assert not step.match(base.splitlines()[0]), base
