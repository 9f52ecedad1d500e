"""Edit values in params.yaml in place, keeping its comments and layout (intake writes a few keys).

PyYAML drops comments when it writes, and params.yaml's comments are its documentation, so the file is
edited round-trip with ruamel.yaml (the library DVC's own ``dvc exp run -S`` edits it with): every comment
and untouched line stays, whatever layout wrote the file (ours, PyYAML's ``safe_dump``, DVC's rewrite with
each list at its key's indentation, flow style). A new list or mapping value is written in flow style on
its key's line (``[HorizontalFlip]``, ``[{name: SquareSymmetry, p: 1.0}]``), so the key's comment stays
beside it. The result is read back and must hold exactly the values written.
"""

from __future__ import annotations

import difflib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_file

# (mapping, sequence, offset) indentations ruamel.yaml can write: ours (lists indented under their key),
# DVC's and PyYAML's (lists at their key's indentation), and the same at four spaces.
LAYOUTS = ((2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 6, 4), (4, 4, 0))


class ParamsEditError(PipelineError, RuntimeError):
    """A key could not be written into params.yaml by this editor; the message says which, to set by hand."""


def _editor(layout: tuple[int, int, int]) -> YAML:
    editor = YAML()  # round-trip: comments, key order, quotes and flow/block style kept
    editor.preserve_quotes = True
    editor.width = 4096  # never fold a long line that was one line
    mapping, sequence, offset = layout
    editor.indent(mapping=mapping, sequence=sequence, offset=offset)
    # A value we set to None reads 'null' as params.yaml writes it (ruamel's default leaves it empty).
    editor.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return editor


def _dump(editor: YAML, document: Any) -> str:
    out = io.StringIO()
    editor.dump(document, out)
    return out.getvalue()


def _layout(text: str) -> tuple[int, int, int]:
    """The indentation that writes ``text`` back unchanged (or with the fewest changed lines)."""

    def changed(layout: tuple[int, int, int]) -> int:
        editor = _editor(layout)
        again = _dump(editor, editor.load(text)).splitlines()
        return sum(
            tag != "equal"
            for tag, *_ in difflib.SequenceMatcher(None, text.splitlines(), again).get_opcodes()
        )

    return min(LAYOUTS, key=changed)


def _flow(value: Any) -> Any:
    """``value`` as ruamel nodes in flow style (JSON types: tuples become lists)."""
    if isinstance(value, list):
        seq = CommentedSeq(_flow(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        mapping = CommentedMap((k, _flow(v)) for k, v in value.items())
        mapping.fa.set_flow_style()
        return mapping
    return value


def set_values(params_file: Path, values: Mapping[str, Any]) -> None:
    """Set each ``'section.key': value`` in ``params_file``, changing only those keys' lines."""
    text = params_file.read_text()
    try:
        layout = _layout(text)
        editor = _editor(layout)
        document = editor.load(text)
    except YAMLError as err:
        raise ParamsEditError(f"{params_file}: not valid YAML ({' '.join(str(err).split())})") from None
    if document is None:
        document = CommentedMap()
    if not isinstance(document, CommentedMap):
        raise ParamsEditError(f"{params_file}: not a mapping of sections; cannot set {', '.join(values)}")
    plain = json.loads(json.dumps(dict(values)))
    for dotted, value in plain.items():
        section, _, key = dotted.partition(".")
        if document.get(section) is None:
            document[section] = CommentedMap()
        if not isinstance(document[section], CommentedMap):
            raise ParamsEditError(f"{params_file}: {section} is not a mapping; set {dotted} by hand")
        document[section][key] = _flow(value)
    new = _dump(editor, document)
    loaded = yaml.safe_load(new) or {}
    for dotted, value in plain.items():
        section, _, key = dotted.partition(".")
        if (loaded.get(section) or {}).get(key, object()) != value:
            raise ParamsEditError(f"{params_file}: could not set {dotted} to {value!r}; set it by hand")
    with atomic_file(params_file) as tmp:
        tmp.write_text(new)
