"""The user's terminal: fedlite's lines and the libraries' warnings that matter, not Flower's debug
lines, its deprecation notice of the simulation entry point or Ray's tip about GPU visibility."""

from __future__ import annotations

import logging
import warnings

import pytest

from fedlite.log_setup import setup_logging

RAY_TIP = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
           "num_gpus=0 or num_gpus=None (default).")


@pytest.fixture
def flower_logger():
    flower = logging.getLogger("flwr")
    saved = flower.level, flower.propagate, list(flower.filters)
    yield flower
    flower.setLevel(saved[0])
    flower.propagate = saved[1]
    flower.filters[:] = saved[2]


def _emit(flower):
    flower.debug("Registered 10 nodes")
    flower.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated\n\n    It will be removed.")
    flower.warning("SuperLink unreachable, retrying")
    logging.getLogger("fedlite.federated.simulation").info("simulating 10 sites")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(RAY_TIP, FutureWarning)
    return caught


def test_by_default_only_what_needs_attention_reaches_the_terminal(flower_logger, capfd):
    setup_logging(verbose=False)
    setup_logging(verbose=False)  # twice, as every CLI invocation in one process does: one filter
    caught = _emit(flower_logger)
    err = capfd.readouterr().err
    assert "SuperLink unreachable, retrying" in err and err.count("SuperLink unreachable") == 1
    assert "Registered 10 nodes" not in err and "DEPRECATED FEATURE" not in err
    assert not caught
    assert len(flower_logger.filters) == 1


def test_verbose_passes_the_libraries_debug_lines_on(flower_logger, caplog):
    setup_logging(verbose=False)
    setup_logging(verbose=True)  # after a quiet call too
    with caplog.at_level(logging.DEBUG):
        flower_logger.debug("Registered 10 nodes")
    assert "Registered 10 nodes" in caplog.text  # reached the root logger, whose handler prints it
