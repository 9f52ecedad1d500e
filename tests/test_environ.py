"""pipeline.environ: torch's CPU threads pinned from train.cpu_threads, and one word when the machine is loaded."""

import logging
import os

import pytest
import torch

from pipeline import environ


@pytest.fixture(autouse=True)
def threads_restored(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(environ, "_warned_loaded", False)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    yield
    torch.set_num_threads(before)


def test_a_loaded_machine_is_named_once(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.environ"):
        assert not environ.warn_if_loaded(1.5, 2)
        assert caplog.text == ""
        assert environ.warn_if_loaded(7.9, 2) and environ.warn_if_loaded(9.0, 2)
    assert caplog.text.count("the machine is loaded: load average 7.9 on 2 cores") == 1
    assert "OMP_NUM_THREADS=1" in caplog.text


def test_threads_are_the_pinned_count_else_the_free_cores():
    assert environ.cpu_threads(2, load=9.0, n_cores=2) == 2  # pinned: the same numbers on any machine
    assert environ.cpu_threads(None, load=0.2, n_cores=8) == 7
    assert environ.cpu_threads(None, load=3.5, n_cores=8) == 4  # another process's threads left their cores
    assert environ.cpu_threads(None, load=12.0, n_cores=8) == 1


def test_use_cpu_threads_sets_torch_and_the_workers_environment(monkeypatch, caplog):
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    with caplog.at_level(logging.WARNING, logger="pipeline.environ"):
        assert environ.use_cpu_threads(3) == 3
    assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    assert "the machine is loaded" in caplog.text
    assert environ.use_cpu_threads(None) == 1
    assert torch.get_num_threads() == 1
