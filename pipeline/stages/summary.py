"""``python -m pipeline summary``: after ``make demo``, say whether every stage is up to date, where the results
are and how to look at them.

Light on purpose (no torch, no evaluation package: it printed after 10 s before): it reads the headline
metrics file and asks ``dvc status`` which stages are stale.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import psutil

from pipeline.config import Params

RWLOCK = Path(".dvc") / "tmp" / "rwlock"  # DVC's lock file: which running dvc command holds which path

HELP = """summary: after `make demo` (or any `dvc repro`), whether every stage is up to date, the headline test
metrics, and where the metrics, plots, report, model and MLflow runs are."""


def stale_stages() -> tuple[list[str], str | None]:
    """The stages ``dvc status`` finds out of date, and why it could not tell (None when it could)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        holders = lock_holders(RWLOCK)
        if holders:  # DVC's own last line would advise removing the lock a live command holds
            return [], (
                f"{', '.join(holders)} is running and holds DVC's lock ({RWLOCK}); wait for it to finish "
                "and run this again (do not remove the lock while it runs)"
            )
        lines = (done.stderr or done.stdout).strip().splitlines()
        return [], lines[-1] if lines else f"exit code {done.returncode}"
    return sorted(json.loads(done.stdout or "{}")), None  # stage names (or .dvc files) that changed


def lock_holders(rwlock: Path) -> list[str]:
    """``'cmd' (pid N)`` for each live process that DVC's rwlock file names (none when it is absent or unreadable)."""
    try:
        lock = json.loads(rwlock.read_text())
    except (OSError, ValueError):
        return []
    entries = list((lock.get("write") or {}).values())
    entries += [entry for readers in (lock.get("read") or {}).values() for entry in readers]
    live = {
        (entry["pid"], entry.get("cmd", "dvc"))
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("pid"), int) and psutil.pid_exists(entry["pid"])
    }
    return [f"'{cmd}' (pid {pid})" for pid, cmd in sorted(live)]


def main(params: Params, args: argparse.Namespace) -> None:
    p = params.paths
    metrics = json.loads(Path(p.metrics).read_text()) if Path(p.metrics).is_file() else {}
    stale, unknown = stale_stages()
    if unknown:
        print(f"\nPipeline status unknown: dvc status failed ({unknown}).")
    elif stale:
        print(
            f"\nPipeline NOT up to date: stale {', '.join(stale)} (dvc status; `dvc repro` reruns them). "
            "The results below are from an earlier run."
        )
    else:
        print("\nPipeline finished: every stage up to date.")
    if metrics:
        # The headline file's test metrics; one can be undefined (AUROC when the test split lacks a class).
        shown = {
            k.removeprefix("test/"): v
            for k, v in metrics.items()
            if k.startswith("test/")
            and k.count("/") == 1
            and not k.endswith(("_ci_low", "_ci_high", "bootstrap_skipped"))
        }  # also an older, full file
        print("  test metrics   " + "  ".join(f"{k}={v:.3f}" for k, v in shown.items()))
        if not metrics.get("weights/pretrained", True):
            print(
                "  WARNING        trained from random init: ImageNet weights could not be downloaded (see report)"
            )
    print(f"  metrics        {p.metrics}        (dvc metrics show; the rest: {p.metrics_detail})")
    print(
        f"  plots          {p.plots}/, {p.confusion}, {p.augment_preview}   (dvc plots show: needs the network)"
    )
    print(f"  report         {p.report}")
    print(f"  model          {p.model_dir}/")
    print(f"  MLflow UI      make ui   (or: mlflow ui --backend-store-uri {params.mlflow.tracking_uri})")
