"""The TUI chat decodes like the CLI: the same DecodeConfig (library defaults, temperature included)
for the same choice, run by the same `run_strategy`."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest

from app import engine
from mlxpt.decode.options import DEFAULT_TEMPERATURE, SAMPLED, DecodeConfig
from mlxpt.decode.strategies import STRATEGIES


def _cli(*flags: str) -> DecodeConfig:
    """The DecodeConfig `mlxpt chat` runs with for these flags."""
    from mlxpt.commands import chat
    from mlxpt.commands.generate import check_auto_args, check_common, decode_config

    parser = argparse.ArgumentParser()
    chat.register(parser.add_subparsers())
    args = parser.parse_args(["chat", *flags])
    check_common(args)  # fills in the default temperature
    check_auto_args(args)  # --budget as a number, the calibration table
    return decode_config(args)


def _resolved(cfg: DecodeConfig) -> DecodeConfig:
    return replace(cfg, sampling=cfg.sampling_settings())


def test_tui_chat_and_cli_build_the_same_decode_config():
    assert _resolved(engine.decode_config()) == _resolved(_cli())  # nothing chosen: one greedy stream
    for name in STRATEGIES:
        tui = engine.decode_config(name, 4)
        # auto: the chat screen's budget is n x CHAT_BUDGET_PER_N (`mlxpt chat --budget`)
        budget = ("--budget", str(4 * engine.CHAT_BUDGET_PER_N)) if name == "auto" else ()
        cli = _cli("--strategy", name, "--n", str(tui.n), *budget)
        assert _resolved(tui) == _resolved(cli), name
        want = DEFAULT_TEMPERATURE if name in SAMPLED else 0.0
        assert tui.sampling_settings().temperature == _cli("--strategy", name, *budget).sampling_settings().temperature
        assert tui.sampling_settings().temperature == want


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A fake model that always says 'a' (tests/test_tts_fakes.py) and the byte tokenizer."""
    from test_tts_fakes import FakeLM, byte_tokenizer

    tok = byte_tokenizer(tmp_path_factory.mktemp("tok"))
    V, a = len(tok.get_vocab()), tok.encode("a")[0]

    def fn(history):
        logits = np.zeros(V, np.float32)
        logits[a] = 30.0
        return logits

    return FakeLM(V, fn), tok


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_tui_answers_through_run_strategy(tiny_lm, monkeypatch, name):
    import mlxpt.decode.strategies as strategies

    lm, tok = tiny_lm
    seen, texts = [], []
    real = strategies.run_strategy

    def recording(*a, **kw):
        seen.append(a[3])
        return real(*a, **kw)

    monkeypatch.setattr(strategies, "run_strategy", recording)
    cfg = engine.decode_config(name, 2, 5)
    got = engine.answer(lm, tok, [{"role": "user", "content": "hi"}], cfg, texts.append)
    assert seen == [cfg] and got.strategy == name
    assert got.text == "".join(texts) == "aaaaa" and (got.tokens == 5 if cfg.streamed else got.tokens >= 5)
    assert bool(got.detail) != cfg.streamed  # votes or scores for the strategies that draw several


def test_tui_stream_stops_when_cancelled(tiny_lm):
    lm, tok = tiny_lm
    got = engine.answer(
        lm, tok, [{"role": "user", "content": "hi"}], engine.decode_config("sample"), cancelled=lambda: True
    )
    assert got.text == "a" and got.tokens == 1
