"""Before a federated run writes anything, every site checks its own data.

A site with a broken manifest or an undecodable image would otherwise fail its first round (or its
hundredth, when the bad image comes up) after the coordinator has created its run directory. Here
each site validates its manifest(s) and decodes every image, logs each problem in its own log (they
name cases and paths, so they stay there), and sends back two numbers: cases read and problems
found. A site with problems stops the run before it starts, named with their count; so do too few
sound sites to run (a site that could not answer is left to the rounds, which screen every reply).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlite.errors import InputError, Problem
from fedlite.federated.replies import reply_metrics
from fedlite.federated.rounds import QUERY_TIMEOUT, ask_sites, read_replies, wait_for_nodes

log = logging.getLogger(__name__)

MESSAGE_TYPE = "query.datacheck"
CHECK_HINT = ("the site's administrator reads the problems in the agent's log, or runs 'fedlite agent check' "
              "(or 'fedlite data check DIR') there")


@dataclass(frozen=True)
class SiteDataCheck:
    cases: int
    problems: int


def check_sites_data(grid, minimum: int, timeout: float = QUERY_TIMEOUT) -> dict[str, SiteDataCheck]:
    """Every connected site checks its data. Raises, naming each site, if any site found problems in
    its data, or if fewer than ``minimum`` sites answered that theirs is sound; a site that could not
    answer (gone, timed out) is logged and left to the rounds, which screen it like any other."""
    nodes = wait_for_nodes(grid, minimum)
    answered = ask_sites(grid, nodes, RecordDict({"config": ConfigRecord({"decode-images": True})}), MESSAGE_TYPE,
                         timeout)
    checks = read_replies(answered, "data check", _read_check)
    problems = [Problem(f"{site}: {check.problems} problem(s) in its data ({check.cases} cases read)")
                for site, check in sorted(checks.items()) if check.problems]
    sound = [site for site, check in checks.items() if not check.problems]
    if problems or len(sound) < max(1, minimum):
        unanswered = [Problem(f"{failure.site}: {failure.reason}") for failure in answered.failed]
        raise InputError([Problem("the sites' data is not ready; the run wrote nothing", hint=CHECK_HINT),
                          *problems, *unanswered,
                          *([] if problems else [Problem(f"{len(sound)} site(s) checked their data, the run "
                                                         f"needs {max(1, minimum)}")])])
    log.info("data checked at %d sites: %s", len(checks),
             ", ".join(f"{site} {check.cases} cases" for site, check in sorted(checks.items())))
    return checks


def _read_check(site: str, msg: Message) -> SiteDataCheck:
    metrics = reply_metrics(msg, required=("num-examples", "problems"))
    return SiteDataCheck(int(metrics["num-examples"]), int(metrics["problems"]))


# ------------------------------------------------------------------------------------- at the site


def check_own_data(data_dir: Path) -> SiteDataCheck:
    """Validate the site's dataset (and its ``val/`` part, when it has one), decoding every image;
    each problem goes to this site's log only."""
    from fedlite.data.check import check_dataset
    from fedlite.data.holdout import VAL_DIR

    parts = [data_dir] + ([data_dir / VAL_DIR] if (data_dir / VAL_DIR).is_dir() else [])
    cases, problems = 0, 0
    for part in parts:
        report = check_dataset(part, decode_images=True)
        cases += report.cases
        problems += len(report.problems)
        for problem in report.problems:
            log.error("data check: %s", problem)
    return SiteDataCheck(cases, problems)


def data_check_reply(msg: Message, check: SiteDataCheck, site: str) -> Message:
    """Two counts and the site's name: nothing about any case."""
    content = RecordDict({"metrics": MetricRecord({"num-examples": check.cases, "problems": check.problems}),
                          "info": ConfigRecord({"site": site})})
    return Message(content, reply_to=msg)
