"""Where an interrupted training run keeps what it needs to continue instead of starting over.

The train stage trains inside ``.<model_dir>.resume/`` (beside paths.model_dir, outside DVC's
outputs, which DVC deletes before a stage runs): the full-state ``last.ckpt`` of the latest epoch,
the best epoch's weights (both in ``checkpoints/``), and the MLflow run id (``state.json``). Running the stage again with the same inputs
resumes from ``last.ckpt`` in the same MLflow run; other inputs discard it. A finished run clears it.

Checkpoints are written atomically in their own folder (:class:`AtomicCheckpointIO`): a kill or a full disk
leaves the previous one. One left unreadable all the same (a file from an older version, a bad disk) is
reported and training starts over, instead of every later run stopping on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from pipeline.fsutil import atomic_file, write_json
from pipeline.runinfo import CHECKPOINT_SUFFIX, LAST

log = logging.getLogger(__name__)

STATE = "state.json"


@dataclass(frozen=True)
class Resume:
    dir: Path
    key: str  # fingerprint of everything that defines the run

    @classmethod
    def beside(cls, model_dir: str | Path, *fingerprint: bytes | str) -> Resume:
        model_dir = Path(model_dir)
        digest = hashlib.sha256()
        for part in fingerprint:
            digest.update(part.encode() if isinstance(part, str) else part)
        return cls(model_dir.with_name(f".{model_dir.name}.resume"), digest.hexdigest()[:16])

    def run_id(self) -> str | None:
        """The MLflow run of an interrupted run with the same inputs, or None (stale state is removed)."""
        path = self.dir / STATE
        state = json.loads(path.read_text()) if path.is_file() else {}
        if state.get("key") == self.key:
            return state["run_id"]
        self.clear()
        return None

    def start(self, run_id: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / STATE, {"key": self.key, "run_id": run_id})  # atomic: a kill leaves old or new

    @property
    def checkpoints(self) -> Path:
        """Where fit writes best.ckpt and last.ckpt (a folder of their own: state.json stays beside it)."""
        return self.dir / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        """``last.ckpt`` when there is one that can be read whole; else None (training starts over)."""
        last = self.checkpoints / f"{LAST}{CHECKPOINT_SUFFIX}"
        if not last.is_file():
            return None
        if problem := unreadable(last):
            log.warning(
                "%s cannot be read (%s): training starts over from epoch 0 (the file is replaced at the end "
                "of the first epoch)",
                last,
                problem,
            )
            return None
        return last

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def unreadable(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` (a ``torch.save`` zip archive) cannot be read whole, or None: every member's CRC is
    checked, nothing is unpickled."""
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None if bad is None else f"member {bad} is corrupt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, staged beside the target and renamed into place: Lightning's own stages
    in the system's temporary folder and then copies, so a full disk or a kill mid-copy truncated ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(path) as staging:
            torch.save(checkpoint, staging)
