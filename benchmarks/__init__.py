"""Benchmarks beside the product: speed (``make bench``), and quality, scale and transfer on real data.

They import the package; the package never imports them (``python -m pipeline bench`` runs
``python -m benchmarks`` in a process of its own). ``SHARED_DATA`` is the one place that says where the
real data sets live: ``../shared/data`` beside the repository.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
