"""Datasets: read and validate JSONL, encode with loss masks, batch, check, synthesise."""

from mlxpt.data.batching import batch_plan, collate
from mlxpt.data.check import check_report
from mlxpt.data.encode import Example, encode, encode_all
from mlxpt.data.formats import Row, load_splits, read_jsonl, scan_jsonl

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
    "scan_jsonl",
]
