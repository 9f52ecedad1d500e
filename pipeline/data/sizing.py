"""The size stage's work: ``data.image_size`` resolved to a side (``pipeline.data.size`` holds the record and its
reasons). The images' own size is read from a sample of the set's files, listed without decoding the rest."""

from __future__ import annotations

import statistics
from pathlib import Path

from pipeline.config import Data
from pipeline.data import shards, size
from pipeline.data.layout import is_sharded
from pipeline.data.listing import scan
from pipeline.data.prepared import DataError
from pipeline.data.readers import UnreadableImage, read, read_bytes

SIZE_SAMPLE = 64  # files whose sides decide the images' own size (evenly spaced over the set)


def own_size(raw_dir: Path, data: Data) -> int:
    """The images' own side: the median shorter side of up to :data:`SIZE_SAMPLE` files, evenly spaced in the
    set's order (a sample decoded, not the set)."""
    sharded = is_sharded(raw_dir)
    table = shards.scan(raw_dir) if sharded else scan(raw_dir)[0]
    sample = table.iloc[:: max(1, len(table) // SIZE_SAMPLE)]
    items = shards.members(sample) if sharded else [Path(p) for p in sample["path"]]
    sides = []
    for item in items:
        try:
            if isinstance(item, shards.Member):
                found = read_bytes(shards.read(item), item.member, data.dicom_window, data.max_image_pixels)
            else:
                found = read(item, data.dicom_window, data.max_image_pixels)
        except (UnreadableImage, OSError):
            continue  # ingest reports it; one unreadable file does not decide the size
        sides.append(min(found.pixels.shape[:2]))
    if not sides:
        raise DataError(f"{raw_dir}: none of {len(items)} sampled images could be read to find their size")
    return int(statistics.median_low(sides))


def resolve_size(data: Data, raw_dir: Path, native: int | None) -> size.ImageSize:
    """``data.image_size`` as a side: the number given; else ``native`` (the size the starting weights were
    trained at; None: no pretrained weights load), else the images' own size, capped."""
    if data.image_size != "auto":
        return size.set_by_params(data.image_size)
    if native is not None:
        return size.from_weights(native)
    return size.from_images(own_size(raw_dir, data))
