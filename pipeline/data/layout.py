"""How a handed-in set lies in ``paths.raw/NAME``: its files under their paths (the folder layout), or a
manifest in git and tar shards beside it (the shard layout, ``shards``).

The few names every reader of a set shares, apart from the code that packs and reads shards: the train and
tune stages' data version (``tracking.data_version``) asks only which layout a set has and where its manifest
is, and needs none of that code.
"""

from __future__ import annotations

from pathlib import Path

SHARDS_CSV = "shards.csv"  # the shard layout's manifest: a row per file (git)
SHARDS_DIR = "shards"  # its tar shards (dvc add)


def is_sharded(root: Path) -> bool:
    return (root / SHARDS_CSV).is_file()


def tracked(root: Path) -> Path:
    """What DVC versions of the set in ``root``: the shards folder (the manifest is in git), or the whole folder."""
    return root / SHARDS_DIR if is_sharded(root) else root
