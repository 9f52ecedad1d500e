"""Where an interrupted training run keeps what it needs to continue instead of starting over.

The train stage trains inside ``.<model_dir>.resume/`` (beside paths.model_dir, outside DVC's
outputs, which DVC deletes before a stage runs): the full-state ``last.ckpt`` of the latest epoch,
the best epoch's weights (both in ``checkpoints/``), and the MLflow run id (``state.json``). Running the stage again with the same inputs
resumes from ``last.ckpt`` in the same MLflow run; other inputs discard it. A finished run clears it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.fsutil import write_json
from pipeline.runinfo import CHECKPOINT_SUFFIX, LAST

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
        last = self.checkpoints / f"{LAST}{CHECKPOINT_SUFFIX}"
        return last if last.is_file() else None

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
