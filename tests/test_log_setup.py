"""The user's terminal: fedlite's lines and the libraries' warnings that matter, not Flower's debug
lines, its deprecation notice of the simulation entry point or Ray's tip about GPU visibility."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from fedlite.log_setup import setup_logging

RAY_TIP = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
           "num_gpus=0 or num_gpus=None (default).")


@pytest.fixture
def flower_logger():
    flower, fedlite = logging.getLogger("flwr"), logging.getLogger("fedlite")
    saved = flower.level, flower.propagate, list(flower.filters), fedlite.level
    yield flower
    flower.setLevel(saved[0])
    flower.propagate = saved[1]
    flower.filters[:] = saved[2]
    fedlite.setLevel(saved[3])


def _emit(flower):
    flower.debug("Registered 10 nodes")
    flower.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated\n\n    It will be removed.")
    flower.warning("SuperLink unreachable, retrying")
    logging.getLogger("fedlite.federated.simulation").info("simulating 10 sites")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(RAY_TIP, FutureWarning)
    return caught


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_by_default_only_what_needs_attention_reaches_the_terminal(flower_logger):
    setup_logging(verbose=False)
    setup_logging(verbose=False)  # twice, as every CLI invocation in one process does: one filter
    flowers_own, root = _Kept(), _Kept()  # where Flower's console handler and fedlite's handler sit
    flower_logger.addHandler(flowers_own)
    logging.getLogger().addHandler(root)
    try:
        caught = _emit(flower_logger)
    finally:
        flower_logger.removeHandler(flowers_own)
        logging.getLogger().removeHandler(root)
    assert flowers_own.lines == ["SuperLink unreachable, retrying"]
    assert root.lines == ["simulating 10 sites"]  # Flower's warning is not printed a second time
    assert not caught
    assert len(flower_logger.filters) == 1


def test_verbose_passes_the_libraries_debug_lines_on(flower_logger):
    setup_logging(verbose=False)
    setup_logging(verbose=True)  # after a quiet call too
    root = _Kept()
    logging.getLogger().addHandler(root)
    try:
        flower_logger.debug("Registered 10 nodes")
    finally:
        logging.getLogger().removeHandler(root)
    assert root.lines == ["Registered 10 nodes"]  # reached the root logger, whose handler prints it


def _flower_lines_of_a_new_process() -> str:
    """What Flower prints in a fresh process, as a simulated site (a Ray worker) is one."""
    import subprocess
    import sys

    script = ("import logging\nfrom flwr.supercore import log\n"
              "log(logging.WARNING, 'Manually terminating ClientAppActor')\nlog(logging.ERROR, 'the site failed')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def test_simulated_sites_report_only_flowers_errors_unless_verbose(flower_logger, monkeypatch):
    from fedlite.log_setup import quiet_site_processes

    monkeypatch.delenv("FLWR_LOG_LEVEL", raising=False)
    setup_logging(verbose=False)
    with quiet_site_processes():
        quiet = _flower_lines_of_a_new_process()
    assert "the site failed" in quiet and "Manually terminating" not in quiet
    assert "FLWR_LOG_LEVEL" not in os.environ  # the user's own environment is left as it was
    setup_logging(verbose=True)
    with quiet_site_processes():
        assert "Manually terminating" in _flower_lines_of_a_new_process()
