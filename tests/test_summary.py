import json

from pipeline import config, summary


def test_summary_shows_the_metrics_there_are(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = config.parse({})
    (tmp_path / "reports").mkdir()
    # AUROC is undefined (and absent) when the test split lacks a class.
    (tmp_path / params.paths.metrics).write_text(json.dumps({"test/accuracy": 0.5, "test/balanced_accuracy": 0.5,
                                                             "test/macro_f1": 0.4, "weights/pretrained": False}))
    summary.main(params)
    out = capsys.readouterr().out
    assert "accuracy=0.500" in out and "auroc" not in out and "random init" in out
