"""The dvc commands README.md and docs/dvc.md give, run in a small DVC repository shaped like ours (the same
params.yaml, metric names and tuning summary, code dependencies under pipeline/, git-tracked reports/)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

WIDTH = 120
# The evaluate stage's stand-in: metrics that depend on the params; a train.lr of 'bad' fails as a bad value would.
WRITE = """
import hashlib, json, sys
import yaml
p = yaml.safe_load(open("params.yaml"))
if p["train"]["lr"] == "bad":
    sys.exit("error: params.yaml: train.lr: 'bad' is not a number")
keys = json.load(open("keys.json"))
h = int(hashlib.md5(json.dumps(p, sort_keys=True).encode()).hexdigest(), 16)
for name, path in (("metrics", "reports/metrics.json"), ("detail", "reports/metrics_detail.json")):
    json.dump({k: (h >> i) % 1000 / 1000 for i, k in enumerate(keys[name])}, open(path, "w"))
summary = {"enabled": True, "study": "demo-resnet18-" + hex(h)[2:14], "trials_complete": 3,
           "trials_pruned": h % 2, "trials_failed": 0, "best_value": h % 97 / 97, "best_trial": h % 3}
json.dump(summary, open("data/tune/summary.json", "w"))
"""
DVC_YAML = """
stages:
  evaluate:
    cmd: python write.py
    deps: [pipeline/config.py, pipeline/fit.py, write.py, keys.json]
    params: [seed, train, augment, tune, evaluate]
    outs:
      - reports/metrics_detail.json:
          cache: false
    metrics:
      - reports/metrics.json:
          cache: false
      - data/tune/summary.json:
          cache: false
"""


def run(cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` in a shell, as a user types it; dvc and python from this interpreter's environment, a wide terminal."""
    env = dict(
        os.environ, COLUMNS="1000", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    done = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"{cmd}: {done.stderr}"
    return done


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvcrepo")
    for folder in ("pipeline", "reports", "data/tune"):
        (root / folder).mkdir(parents=True)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    keys = {
        name: list(json.loads((REPO / "reports" / f).read_text()))
        for name, f in (("metrics", "metrics.json"), ("detail", "metrics_detail.json"))
    }
    (root / "keys.json").write_text(json.dumps(keys))
    (root / "write.py").write_text(WRITE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    for name in ("config", "fit"):
        (root / "pipeline" / f"{name}.py").write_text("x = 1\n")
    for cmd in (
        "git init -q && git config user.email t@t && git config user.name t && dvc init -q",
        "dvc repro -q && git add -A && git commit -qm base",
        "dvc exp run -q -n lower-lr -S train.lr=0.0003",
        "dvc exp run -q -n natural -S augment.preset=natural -S train.max_epochs=20",
        "echo 'x = 2' > pipeline/fit.py && dvc exp run -q -n code-change",  # a code dependency differs too
        "git checkout -q -- . && dvc exp apply -q lower-lr && git checkout -q -- . && dvc checkout -q",
    ):
        run(cmd, root)
    return root


def documented(page: Path, starts: tuple[str, ...]) -> list[str]:
    """The lines of ``page``'s code blocks that start with one of ``starts``, comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines if line.startswith(starts)]


def test_the_readmes_tables_fit_a_terminal(repo):
    """The README's "table that fits a terminal" was 495 columns, `dvc metrics show` of the detail file 2,218."""
    commands = documented(REPO / "README.md", ("dvc exp show", "dvc metrics show", "python -m json.tool"))
    assert any(c.startswith("dvc exp show") for c in commands) and any(
        "metrics_detail" in c for c in commands
    )
    shown = {}
    for cmd in commands:
        out = run(cmd, repo).stdout
        shown[cmd] = out
        if "--md" in cmd or "--json" in cmd:
            continue  # documented as a table for a viewer or a program
        widest = max(len(line.rstrip()) for line in out.splitlines())
        assert widest <= WIDTH, f"{cmd}: {widest} columns"
    table = next(out for cmd, out in shown.items() if cmd.startswith("dvc exp show"))
    for column in ("test/balanced_accuracy", "test/auroc", "train.lr", "augment.preset", "train.max_epochs"):
        assert column in table, column  # the params that differ stay, beside the kept metrics
    assert "pipeline/" not in table and "best_value" not in table and "[natural]" in table
    assert "test/auroc_ci_low" in "".join(shown.values())  # the detail file, one metric a line


def git_tracked_outputs() -> set[str]:
    """The real dvc.yaml's outputs kept in git (``cache: false``), their ``${paths.*}`` resolved."""
    import yaml

    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    for name, options in entry.items():
                        if (options or {}).get("cache") is False:
                            found.add(re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], name))
    return found


@pytest.mark.parametrize("start", ["git add params.yaml dvc.lock", "git checkout -- params.yaml"])
def test_the_documented_git_commands_name_every_output_git_keeps(start):
    [line] = documented(REPO / "docs" / "dvc.md", (start,))
    named = shlex.split(line.split("&&")[0])[2:]
    missing = [
        out
        for out in git_tracked_outputs()
        if not any(out == n or out.startswith(n.rstrip("/") + "/") for n in named)
    ]
    assert not missing, f"docs/dvc.md's `{start} ...` leaves out {missing}"


def test_keeping_an_experiment_commits_every_tracked_output(repo):
    """docs/dvc.md's `git add params.yaml dvc.lock` left the git-tracked reports uncommitted."""
    [add] = documented(REPO / "docs" / "dvc.md", ("git add params.yaml dvc.lock",))
    run("dvc exp apply -q natural", repo)
    run(add.replace('"natural augmentation preset"', "kept"), repo)
    assert run("git status --porcelain", repo).stdout == ""
    assert run("dvc status -q", repo).returncode == 0


def test_the_documented_recovery_undoes_a_failed_experiment(repo):
    """A failed `dvc exp run` leaves the bad value in params.yaml and the failed stage's outputs removed."""
    before = (repo / "params.yaml").read_text()
    failed = run("dvc exp run -S train.lr=bad", repo, check=False)
    assert failed.returncode != 0 and "lr: bad" in (repo / "params.yaml").read_text()
    assert not (repo / "reports" / "metrics.json").exists()
    [recover] = documented(REPO / "docs" / "dvc.md", ("git checkout -- params.yaml",))
    run(recover, repo)
    assert (repo / "params.yaml").read_text() == before and (repo / "reports" / "metrics.json").is_file()
    assert run("git status --porcelain", repo).stdout == "" and "up to date" in run("dvc status", repo).stdout
    assert shlex.split(recover)[0] == "git"
