"""Label audit: images whose given label the model's held-out probabilities doubt, ranked, with cleanlab.

Held-out means predicted by a model that did not train on them (today the validation split; out-of-fold
predictions cover every train+val image once cross-validation produces them). cleanlab's confident
learning (``find_label_issues``, prune by noise rate) flags likely errors; its label quality score
(self-confidence: the probability of the given label) ranks every image, most suspect first. A person
confirms the suspects and lists the wrong ones in ``data.exclude``; nothing is changed automatically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pipeline.data.cache import Images

COLUMNS = ("path", "given", "suggested", "score", "issue")
PANEL_PNG = "label_audit.png"  # in paths.plots


def label_issues(
    probs: np.ndarray, labels: np.ndarray, paths: Sequence[str], class_names: Sequence[str]
) -> pd.DataFrame:
    """One row per image, most suspect first: path, given label, suggested label (the most probable class),
    score (cleanlab's label quality in [0, 1], low = suspect) and issue (cleanlab flags it as a likely error).
    The index keeps each row's position in the inputs."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    flagged = np.zeros(len(labels), dtype=bool)
    if len(np.unique(labels)) > 1:  # confident learning estimates noise rates between classes: it needs two
        flagged[find_label_issues(labels, probs, n_jobs=1)] = True
    names = np.asarray(list(class_names), dtype=object)
    table = pd.DataFrame(
        {
            "path": list(paths),
            "given": names[labels],
            "suggested": names[probs.argmax(1)],
            "score": np.round(get_label_quality_scores(labels, probs), 6),
            "issue": flagged,
        }
    )
    return table.sort_values(["score", "path"], kind="stable")


def disputed(table: pd.DataFrame) -> pd.DataFrame:
    """The rows whose suggested label differs from the given one: what the report's table and panel show.

    A low score with the given label suggested is an uncertain image, not a doubted label; the CSV keeps it
    in the full ranking."""
    return table[table["suggested"] != table["given"]]


def panel_figure(images: Images, table: pd.DataFrame, top: int, columns: int = 4):
    """Thumbnails of the ``top`` first disputed rows of ``table`` (its index: positions in ``images``), each
    under a three-line caption; a cell is tall enough that a caption never reaches the row above."""
    from pipeline.display import image_grid

    shown = disputed(table).head(top)
    return image_grid(
        [images[i] for i in shown.index],
        [f"given {r.given}\nsuggested {r.suggested}\nscore {r.score:.2f}" for r in shown.itertuples()],
        ncols=columns,
        cell=(1.7, 2.3),  # 1.9 let the three caption lines (7 pt) run into the images of the row above
        colors=["tab:red" if issue else "black" for issue in shown["issue"]],
        suptitle="Most suspect labels (held-out predictions; red: flagged by cleanlab)",
        suptitle_size=9,
        suptitle_height=0.4,
        interpolation="antialiased",
    )


def panel_png(images: Images, table: pd.DataFrame, top: int, columns: int = 4) -> bytes:
    """:func:`panel_figure` as PNG bytes."""
    png = io.BytesIO()
    panel_figure(images, table, top, columns).savefig(png, dpi=110, format="png")
    return png.getvalue()


def report_section(table: pd.DataFrame, selection: str, *, csv_path: str, panel: str | None, top: int) -> str:
    """The report's Markdown: how many are flagged, the top rows, the panel."""
    flagged = int(table["issue"].sum())
    doubted = disputed(table)
    head = doubted.head(max(top, 5))
    lines = [
        f"cleanlab on the {len(table)} {selection} predictions: {flagged} image(s) flagged as likely label "
        f"errors; {len(doubted)} where the model suggests another label (listed below, most suspect first). "
        f"Full ranking of every image: `{csv_path}`. Check the files; list the confirmed errors "
        "in a CSV with a `path` column and set `data.exclude` to it to leave them out at the next ingest.",
        "",
        head.to_markdown(index=False, floatfmt=".3f")
        if len(head)
        else "No image where the model suggests another label.",
        "",
    ]
    if panel:
        lines += [f"![label audit]({panel})", ""]
    return "\n".join(lines)
