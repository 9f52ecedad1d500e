"""pipeline.paramsfile: intake's edits of params.yaml keep its comments and work on any layout a tool wrote."""

import pytest
import yaml
from conftest import REPO
from dvc.utils.serialize import modify_yaml

from pipeline.paramsfile import ParamsEditError, set_values

DOMAIN = {  # what intake --domain xray writes
    "augment.preset": "xray",
    "augment.transforms": [{"name": "HorizontalFlip", "p": 0.0}, {"name": "Rotate", "limit": 10}],
    "evaluate.tta": [],
}


class IndentedLists(yaml.SafeDumper):
    """PyYAML writing each list indented under its key (its default puts it at the key's indentation)."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def dvc_rewrite(path):
    """``dvc exp run -S seed=7`` rewrites the file with ruamel.yaml's defaults: lists at their key's indent."""
    with modify_yaml(path) as document:
        document["seed"] = 7


LAYOUTS = {
    "ours": lambda p: p.write_text((REPO / "params.yaml").read_text()),
    "dvc -S": lambda p: (p.write_text((REPO / "params.yaml").read_text()), dvc_rewrite(p)),
    "pyyaml": lambda p: p.write_text(yaml.safe_dump(params(), sort_keys=False)),
    "pyyaml indented": lambda p: p.write_text(yaml.dump(params(), Dumper=IndentedLists, sort_keys=False)),
    "pyyaml flow": lambda p: p.write_text(yaml.safe_dump(params(), default_flow_style=True)),
    "pyyaml sections flow": lambda p: p.write_text(yaml.safe_dump(params(), default_flow_style=None)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_a_tool_writes_takes_the_domain_keys(tmp_path, layout):
    path = tmp_path / "params.yaml"
    LAYOUTS[layout](path)
    before = yaml.safe_load(path.read_text())
    assert before["augment"]["transforms"]  # a block list to replace (the old line editor left it behind)
    set_values(path, DOMAIN)
    after = yaml.safe_load(path.read_text())
    assert after["augment"]["preset"] == "xray" and after["evaluate"]["tta"] == []
    assert after["augment"]["transforms"] == DOMAIN["augment.transforms"]
    for section, values in before.items():  # nothing else changed
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if f"{section}.{k}" not in DOMAIN}
            assert {k: after[section][k] for k in values} == values, section
        else:
            assert after[section] == values


def test_comments_and_untouched_lines_stay(tmp_path):
    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    set_values(path, DOMAIN)
    old, new = original.splitlines(), path.read_text().splitlines()
    changed = [line for line in old if line not in new]
    # The three keys' lines and the old list's one item; every comment-only line is kept.
    assert all(line.lstrip().startswith(("preset:", "transforms:", "tta:", "- ")) for line in changed), (
        changed
    )
    assert len(changed) == 4
    assert [line for line in old if line.lstrip().startswith("#")] == [
        line for line in new if line.lstrip().startswith("#")
    ]
    assert any(line.startswith("  tta: []") and "# test-time augmentation" in line for line in new)
    assert "  dicom_window: null " in path.read_text()  # untouched nulls are not rewritten


def test_missing_section_or_key_is_added_and_none_reads_null(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1  # the seed\ndata:\n  image_size: 32\n")
    set_values(path, {"data.dataset": "2024", "evaluate.tta": ["HorizontalFlip"], "data.exclude": None})
    assert yaml.safe_load(path.read_text()) == {
        "seed": 1,
        "data": {"image_size": 32, "dataset": "2024", "exclude": None},
        "evaluate": {"tta": ["HorizontalFlip"]},
    }
    assert "seed: 1  # the seed\n" in path.read_text() and "exclude: null" in path.read_text()


def test_invalid_yaml_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("augment:\n  preset: [unclosed\n")
    with pytest.raises(ParamsEditError, match=r"params.yaml: not valid YAML"):
        set_values(path, DOMAIN)
    path.write_text("augment: 3\n")
    with pytest.raises(ParamsEditError, match="augment is not a mapping"):
        set_values(path, DOMAIN)
