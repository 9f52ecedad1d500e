"""Edit values in params.yaml in place, keeping its comments and layout (intake writes a few keys).

PyYAML drops comments when it writes, and params.yaml's comments are its documentation, so each key's
line is rewritten by itself: its value becomes YAML flow style (``[HorizontalFlip]``,
``[{name: SquareSymmetry, p: 1.0}]``) on the key's line, a block value's lines below it are dropped,
and every comment stays. The result is read back and must hold exactly the values written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_file


class ParamsEditError(PipelineError, RuntimeError):
    """A key could not be written into params.yaml by this editor; the message says which, to set by hand."""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def _flow(value: Any) -> str:
    return (
        yaml.safe_dump(
            json.loads(json.dumps(value)), default_flow_style=True, width=math.inf, sort_keys=False
        )
        .strip()
        .removesuffix("\n...")
        .strip()
    )


def _set_line(lines: list[str], section: str, key: str, value: Any) -> list[str]:
    start = next(
        (i for i, line in enumerate(lines) if re.match(rf"{re.escape(section)}:\s*(#.*)?$", line)), None
    )
    if start is None:
        return [*lines, "\n", f"{section}:\n", f"  {key}: {_flow(value)}\n"]
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    children = [i for i in range(start + 1, end) if _is_content(lines[i])]
    depth = min((_indent(lines[i]) for i in children), default=2)
    at = next(
        (i for i in children if _indent(lines[i]) == depth and re.match(rf"\s*{re.escape(key)}:", lines[i])),
        None,
    )
    if at is None:
        return [*lines[: start + 1], f"{' ' * depth}{key}: {_flow(value)}\n", *lines[start + 1 :]]
    head, _, comment = lines[at].rstrip("\n").partition(" #")
    after = next((i for i in range(at + 1, end) if _is_content(lines[i]) and _indent(lines[i]) <= depth), end)
    kept = [line for line in lines[at + 1 : after] if not _is_content(line)]  # comments of the key stay
    new = f"{' ' * depth}{key}: {_flow(value)}"
    if comment:  # at the comment's old column, or two spaces after a longer value
        new = (new.ljust(len(head)) if len(new) < len(head) else new + " ") + " #" + comment
    return [*lines[:at], new + "\n", *kept, *lines[after:]]


def set_values(params_file: Path, values: Mapping[str, Any]) -> None:
    """Set each ``'section.key': value`` in ``params_file``, changing only those keys' lines."""
    lines = params_file.read_text().splitlines(keepends=True)
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        lines = _set_line(lines, section, key, value)
    text = "".join(lines)
    loaded = yaml.safe_load(text) or {}
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        if (loaded.get(section) or {}).get(key, object()) != json.loads(json.dumps(value)):
            raise ParamsEditError(f"{params_file}: could not set {dotted} to {_flow(value)}; set it by hand")
    with atomic_file(params_file) as tmp:
        tmp.write_text(text)
