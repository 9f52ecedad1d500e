"""docs/configuration.md: every params.yaml key with its type, default and meaning, from pipeline/config.py.

The typed params are the single source: ``python -m pipeline docs`` (``make docs``) rewrites the file,
and tests/test_docs.py fails when the committed copy differs from what this renders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic.fields import FieldInfo

from pipeline.config import Params, SearchDim

HELP = """docs: rewrite docs/configuration.md (every params.yaml key with its type, default and meaning) from the
typed params in pipeline/config.py, as `make docs` does."""

OUTPUT = Path("docs/configuration.md")
COMMAND = "make docs"  # or: python -m pipeline docs
SEARCH_SPACE = "tune.search_space"

# SearchDim's fields carry no Field(description=...) in config.py; their meaning is stated here.
SEARCH_DIM_DESCRIPTIONS = {
    "type": "How the key is sampled: a float or int range, or one of a list of choices.",
    "low": "Lower bound of a float/int range (required for them; > 0 with log).",
    "high": "Upper bound of a float/int range; must be greater than low.",
    "log": "Sample the range on a log scale.",
    "choices": "Values a categorical key takes (required, non-empty, for categorical).",
}

_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", Any: "any"}
_BOUNDS = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
)


def type_text(annotation: Any) -> str:
    """A reader's name for a field's type: choices spelled out, ``null`` where allowed."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(default_text(a) for a in args)
    if origin in (Union, types.UnionType):
        text = " or ".join(type_text(a) for a in args if a is not type(None))
        return text + " or `null`" if type(None) in args else text
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if annotation is SearchDim:
        return "search dimension (below)"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def constraints_text(field: FieldInfo) -> str:
    parts = [
        f"{sign} {getattr(m, attr)}"
        for m in field.metadata
        for cls, attr, sign in _BOUNDS
        if isinstance(m, cls)
    ]
    parts += [
        "non-empty" for m in field.metadata if isinstance(m, annotated_types.MinLen) and m.min_length == 1
    ]
    return ", ".join(parts)


def default_text(value: Any) -> str:
    """The default as it would be written in params.yaml (JSON flow style for lists and mappings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {k: plain(x) for k, x in dataclasses.asdict(v).items() if x is not None}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    if isinstance(value, str):
        return f'`"{value}"`' if value == "" or value.isdigit() else f"`{value}`"
    return f"`{json.dumps(plain(value))}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(
    prefix: str, fields: dict[str, FieldInfo], descriptions: dict[str, str] | None = None
) -> list[str]:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in fields.items():
        description = (descriptions or {}).get(name) or field.description
        if not description:
            raise ValueError(f"{prefix}{name}: no description in pipeline/config.py (Field(description=...))")
        kind = type_text(field.annotation)
        if bounds := constraints_text(field):
            kind += f"; {bounds}"
        default = (
            "required" if field.is_required() else default_text(field.get_default(call_default_factory=True))
        )
        rows.append(
            "| " + " | ".join(_cell(c) for c in (f"`{prefix}{name}`", kind, default, description)) + " |"
        )
    return rows


def render() -> str:
    """The whole reference, sections in the order of the Params fields (params.yaml's order)."""
    fields = vars(Params)["__pydantic_fields__"]  # pydantic's own: descriptions included
    scalars = {n: f for n, f in fields.items() if not dataclasses.is_dataclass(f.annotation)}
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from pipeline/config.py by `{COMMAND}` (python -m pipeline docs); do not edit by hand. -->",
        "",
        "`params.yaml` is the pipeline's only configuration. Every key is validated on load: an unknown key,",
        "a wrong type or an out-of-range value stops the stage with a message naming the key. Set a value in",
        "`params.yaml` or per experiment with `dvc exp run -S key=value`.",
        "",
        "## Top level",
        "",
        *_table("", scalars),
    ]
    for section, field in fields.items():
        if section in scalars:
            continue
        cls = field.annotation
        lines += ["", f"## `{section}`", ""]
        if cls.__doc__:
            lines += [cls.__doc__.strip(), ""]
        lines += _table(f"{section}.", cls.__pydantic_fields__)
        if SEARCH_SPACE.startswith(f"{section}."):
            lines += _search_space()
    return "\n".join(lines) + "\n"


def _search_space() -> list[str]:
    """Search-space entries are user-named, so their fields are documented once, for any ``<key>``."""
    return [
        "",
        f"### `{SEARCH_SPACE}.<key>`",
        "",
        f"Each entry of `{SEARCH_SPACE}` maps a params key (`section.name`, e.g. `train.lr`) to the range or",
        "choices the Optuna study samples it from; the tuned values override `params.yaml` in the train stage.",
        "",
        *_table(f"{SEARCH_SPACE}.<key>.", vars(SearchDim)["__pydantic_fields__"], SEARCH_DIM_DESCRIPTIONS),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", type=Path, default=OUTPUT, metavar="FILE", help="file to write (default: %(default)s)"
    )


def main(params: Params, args: argparse.Namespace) -> None:
    """Write the reference; ``params`` (the loaded file) plays no part: the types are the source."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render())
    print(f"docs: wrote {args.output}")
