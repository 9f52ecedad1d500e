"""docs/configuration.md is generated from pipeline/config.py and must match it and params.yaml; the
README and docs/ link to pages and headings that exist."""

import re
from pathlib import Path

import yaml

from pipeline import docs
from pipeline.__main__ import main as cli

REPO = Path(__file__).resolve().parents[1]


def yaml_keys(mapping: dict, prefix: str = "") -> list[str]:
    """Dotted keys of a params mapping; search-space entries in their generic ``<key>`` form."""
    keys = []
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if key == docs.SEARCH_SPACE:
            keys.append(key)
            keys += sorted({f"{key}.<key>.{field}" for dim in value.values() for field in dim})
        elif isinstance(value, dict):
            keys += yaml_keys(value, f"{key}.")
        else:
            keys.append(key)
    return keys


def test_committed_reference_is_what_the_generator_renders():
    committed = (REPO / docs.OUTPUT).read_text()
    assert committed == docs.render(), (
        f"{docs.OUTPUT} is out of date with pipeline/config.py: run `{docs.COMMAND}`"
    )


def test_every_params_yaml_key_is_documented_in_params_yaml_order():
    text = docs.render()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = yaml_keys(raw)
    assert "train.lr" in keys and "tune.search_space.<key>.log" in keys
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"params.yaml keys missing from {docs.OUTPUT}: {missing}"
    sections = [k for k, v in raw.items() if isinstance(v, dict)]
    headings = [
        line.removeprefix("## `").removesuffix("`") for line in text.splitlines() if line.startswith("## `")
    ]
    assert headings == sections


def test_main_writes_the_file_and_types_show_choices_and_null(tmp_path, capsys):
    out = tmp_path / "sub" / "configuration.md"
    assert cli(["docs", "--output", str(out)]) == 0
    assert out.read_text() == docs.render() and str(out) in capsys.readouterr().out
    text = out.read_text()
    assert "| `data.on_bad_file` | `skip` \\| `fail` | `skip` |" in text
    assert "| `tune.timeout_s` | number or `null`; > 0 | `null` |" in text
    assert "| `tune.search_space.<key>.type` | `float` \\| `int` \\| `categorical` | required |" in text


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in markdown.splitlines()
        if line.startswith("#")
    }


def test_links_in_the_readme_and_docs_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"(?s)```.*?```", "", page.read_text())  # links in code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and anchor not in anchors(linked.read_text())):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, f"links to missing files or headings: {broken}"
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in pages[1:] if f"(docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_layout_in_docs_pipeline_names_every_module():
    layout = (REPO / "docs" / "pipeline.md").read_text().split("## Layout", 1)[1].split("```")[1]
    rooms = ("pipeline", "pipeline/data", "pipeline/training", "pipeline/evaluation", "benchmarks")
    modules = [path for room in rooms for path in (REPO / room).glob("*.py")]
    missing = sorted(
        p.name for p in modules if p.name not in ("__init__.py", "__main__.py") and p.name not in layout
    )
    assert not missing, f"docs/pipeline.md's layout does not name {missing}"
