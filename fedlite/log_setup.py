"""What reaches the user's terminal: fedlite's own progress and results, and from the libraries
only what needs their attention. ``-v`` shows everything, Flower's and Ray's debug lines included."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

NOISY_LOGGERS = ("urllib3", "matplotlib", "PIL", "filelock", "alembic")
# Flower announces that its simulation entry point is deprecated on every run, and Ray a change of
# its GPU-visibility default when an actor asks for no GPU: neither is for a fedlite user to act on.
FLOWER_NOTICES = ("DEPRECATED FEATURE: The `run_simulation` function",)
RAY_NOTICES = ("Tip: In future versions of Ray, Ray will no longer override accelerator",)


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.starts)


def setup_logging(verbose: bool) -> None:
    """fedlite logs at INFO; libraries (onnxruntime's quantizer logs on the root logger) only warn."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("fedlite").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    flower = logging.getLogger("flwr")
    if verbose:
        flower.setLevel(logging.DEBUG)
        flower.propagate = True
        return
    # Flower logs at DEBUG through a console handler of its own and also passes every record on to
    # the root logger: once, at WARNING, through its own handler is enough.
    flower = logging.getLogger("flwr")
    flower.setLevel(logging.WARNING)
    flower.propagate = False
    if not any(isinstance(f, _DropNotices) for f in flower.filters):
        flower.addFilter(_DropNotices(FLOWER_NOTICES))
    for notice in RAY_NOTICES:
        warnings.filterwarnings("ignore", message=notice, category=FutureWarning)


@contextlib.contextmanager
def quiet_site_processes() -> Iterator[None]:
    """Simulated sites run in Ray's worker processes, which inherit this process's environment but
    not its logging setup: unless the user asked for Flower's lines (``-v``), Flower there reports
    errors only. Its actors otherwise announce their own shutdown, a WARNING, at the end of every
    run. fedlite's own lines from the sites (a site's incident report) are not Flower's and stay."""
    if logging.getLogger("flwr").isEnabledFor(logging.INFO) or "FLWR_LOG_LEVEL" in os.environ:
        yield  # -v, logging left to the caller, or a level the user chose
        return
    os.environ["FLWR_LOG_LEVEL"] = "ERROR"
    try:
        yield
    finally:
        os.environ.pop("FLWR_LOG_LEVEL", None)


def configure_agent_logging(stream=None) -> None:
    """``fedlite agent run``: timestamped lines on stderr (journald keeps them), through the agent's
    own logger, not the root's."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("fedlite.agents")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
