"""Datasets: read and validate JSONL, encode with loss masks, batch, mix in replay rows, check, synthesise."""

from mlxpt.data.batching import batch_plan, collate
from mlxpt.data.check import check_report
from mlxpt.data.encode import Example, encode, encode_all
from mlxpt.data.formats import Row, load_splits, read_jsonl, scan_jsonl
from mlxpt.data.replay import replay_count

__all__ = [
    "Example",
    "Row",
    "batch_plan",
    "check_report",
    "collate",
    "encode",
    "encode_all",
    "load_splits",
    "read_jsonl",
    "replay_count",
    "scan_jsonl",
]
