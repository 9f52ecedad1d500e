"""The active-learning rounds of a labelled set: which labels came back from the pool, and when.

Round 1 is the set as it was taken in; each ``intake labels.csv --add`` (``pipeline.active.loop``) appends one
entry to ``paths.raw/NAME/rounds.json`` and starts the next round. The file travels with the set (inside the
DVC-tracked folder, or beside ``shards.csv`` in git), ingest copies the round into ``report.json``
(``active``), and the tracked stages tag their MLflow runs ``active/round`` and ``active/labels`` from there
(the labels: the train split's images, what a model of that round learned from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.data.prepared import REPORT_JSON

ROUNDS_JSON = "rounds.json"
ROUND_TAG, LABELS_TAG = "active/round", "active/labels"


def read(root: Path) -> list[dict[str, Any]]:
    """The rounds added to the set in ``root`` (oldest first); none for a set never added to."""
    path = root / ROUNDS_JSON
    return json.loads(path.read_text())["rounds"] if path.is_file() else []


def write(root: Path, rounds: list[dict[str, Any]]) -> None:
    """``root/rounds.json`` as a new file (the old one may share its inode with the set it was copied from)."""
    path = root / ROUNDS_JSON
    path.unlink(missing_ok=True)
    path.write_text(json.dumps({"rounds": rounds}, indent=2) + "\n")


def summary(root: Path) -> dict[str, int] | None:
    """What ingest records in ``report.json`` (``active``): the current round and the images added so far."""
    rounds = read(root)
    return {"round": len(rounds) + 1, "added": sum(r["added"] for r in rounds)} if rounds else None


def current(report: dict[str, Any]) -> tuple[int, int]:
    """The round (1 for a set never added to) and the labelled training images of ingest's ``report``."""
    labels = sum(int(n) for n in report["counts"]["train"].values())
    return int((report.get("active") or {}).get("round", 1)), labels


def tags(prepared_dir: Path) -> dict[str, str]:
    """``active/round`` and ``active/labels`` of the prepared set (none before ingest has run)."""
    path = prepared_dir / REPORT_JSON
    if not path.is_file():
        return {}
    number, labels = current(json.loads(path.read_text()))
    return {ROUND_TAG: str(number), LABELS_TAG: str(labels)}
