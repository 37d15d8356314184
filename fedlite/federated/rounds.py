"""How the coordinator talks to its sites: the two kinds of exchange every federated job is made of.

- an update round (train, distill, edge): push the global parameters to sampled sites, collect their
  updates until the deadline (late ones are kept and folded into a later round, damped by their
  staleness), screen them (``update_round``); the loop around it is ``fedlite.federated.engine``;
- a statistics query (evaluate, and the export's importance, calibration and parity jobs): push a
  request to every site and gather the aggregate statistics that come back (``ask_sites``;
  ``federated_evaluate`` merges evaluation statistics).
The coordinator only ever sees parameters and aggregate statistics; a site's failure is recorded
with the site named, never crashes the run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedlite.errors import InputError
from fedlite.eval_stats import EvalStats, merge
from fedlite.federated.aggregate import Rejection, SiteUpdate, screen_updates
from fedlite.federated.compress import decode_update, is_packed, unpack_encoded
from fedlite.federated.replies import reply_arrays, reply_metrics, reply_site
from fedlite.federated.site_guard import TAG

log = logging.getLogger(__name__)
T = TypeVar("T")
QUERY_TIMEOUT = 600.0  # seconds a statistics query waits when the run sets no round timeout


@dataclass
class Outstanding:
    """A train message whose reply has not arrived yet."""

    node_id: int
    server_round: int
    shapes: dict[str, tuple[int, ...]]
    downlink_version: int | None = None  # the version of the global model the message brought


@dataclass
class RoundReplies:
    updates: list[SiteUpdate] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    bytes_received: dict[str, int] = field(default_factory=dict)
    late_dropped: list[str] = field(default_factory=list)
    delivered: dict[int, int] = field(default_factory=dict)  # node → downlink version it answered from
    failed_nodes: list[int] = field(default_factory=list)  # nodes whose job failed: what they hold is unknown


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= max(1, minimum):
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} sites connected after {timeout:.0f} s, need {minimum}")
        time.sleep(0.5)


def sample_sites(nodes: list[int], per_round: int, rng: np.random.Generator) -> list[int]:
    """``per_round`` of the connected sites (all of them for 0), drawn from the run's seeded stream."""
    k = len(nodes) if per_round <= 0 else min(per_round, len(nodes))
    return sorted(nodes[i] for i in rng.choice(len(nodes), size=k, replace=False))


def push(grid: Grid, content: RecordDict | dict[int, RecordDict], nodes: list[int], message_type: str) -> list[str]:
    """One message per node: the same ``content`` for all, or each node's own."""
    def for_node(node: int) -> RecordDict:
        return content[node] if isinstance(content, dict) else content
    return list(grid.push_messages([Message(for_node(n), dst_node_id=n, message_type=message_type) for n in nodes]))


def _parse_update(msg: Message, sent: Outstanding, server_round: int, replies: RoundReplies) -> None:
    site = reply_site(msg, sent.node_id)
    if msg.has_error():
        replies.rejected.append(Rejection(site, site_failure(msg)))
        replies.failed_nodes.append(sent.node_id)
        return
    if sent.downlink_version is not None:  # it answered, so it applied the message's parameters
        replies.delivered[sent.node_id] = max(sent.downlink_version, replies.delivered.get(sent.node_id, -1))
    try:
        raw = reply_arrays(msg)
        replies.bytes_received[site] = msg.content["arrays"].count_bytes()
        delta = decode_update(unpack_encoded(raw), sent.shapes) if is_packed(raw) else raw
        metrics = reply_metrics(msg, required=("num-examples", "train-loss"))
    except (InputError, ValueError) as exc:
        replies.rejected.append(Rejection(site, f"malformed update: {exc}"))
        return
    replies.updates.append(SiteUpdate(site, delta, int(metrics["num-examples"]), server_round - sent.server_round,
                                      metrics))


def site_failure(msg: Message) -> str:
    """A failed site's reason: the line the site meant for the coordinator when the runtime wrapped
    it (Ray's tracebacks in a simulation), else the start of the text; one line, printable only."""
    reason = str(msg.error.reason)
    if TAG in reason:
        reason = reason.split(TAG, 1)[1].split("\n", 1)[0]
        reason = reason.split("'>", 1)[0]  # Flower's "<class ...>:<'text'>" around the exception's text
    return "site failed: " + "".join(c if c.isprintable() else " " for c in reason)[:300]


def collect(grid: Grid, outstanding: dict[str, Outstanding], server_round: int, current: set[str],
            timeout: float, max_staleness: int) -> RoundReplies:
    """Pull replies until every message of this round answered or the deadline passed; replies to
    earlier rounds' messages that arrive meanwhile are kept as stale updates."""
    replies = RoundReplies()
    deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
    while True:
        for msg in grid.pull_messages(list(outstanding)):
            sent = outstanding.pop(msg.metadata.reply_to_message_id, None)
            if sent is not None:
                _parse_update(msg, sent, server_round, replies)
        if not current & set(outstanding) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for message_id, sent in list(outstanding.items()):
        if server_round - sent.server_round >= max_staleness:
            outstanding.pop(message_id)
            replies.late_dropped.append(f"node-{sent.node_id}")
    return replies


def accept_updates(replies: RoundReplies, shapes: dict[str, tuple[int, ...]], server_round: int,
                   max_norm: float = math.inf) -> tuple[list[SiteUpdate], list[Rejection]]:
    """Screen this round's updates together and late ones each on its own; log every rejection."""
    # Stale updates computed while other tensors were trainable are checked against their own round.
    fresh = [u for u in replies.updates if u.staleness == 0]
    stale = [u for u in replies.updates if u.staleness > 0]
    accepted, rejected = screen_updates(fresh, shapes, max_norm)
    for update in stale:
        if not set(update.delta) <= set(shapes):
            rejected.append(Rejection(update.site, "a late update of tensors this round does not train"))
            continue
        kept, refused = screen_updates([update], {n: shapes[n] for n in update.delta}, max_norm)
        accepted += kept
        rejected += refused
    rejected += replies.rejected
    for rejection in rejected:
        log.warning("round %d: rejected the update of %s: %s", server_round, rejection.site, rejection.reason)
    return accepted, rejected


def update_round(grid: Grid, contents: dict[int, RecordDict], shapes: dict[str, tuple[int, ...]],
                 outstanding: dict[str, Outstanding], server_round: int, timeout: float, max_staleness: int,
                 message_type: str = "train", max_norm: float = math.inf,
                 versions: dict[int, int] | None = None) -> tuple[list[SiteUpdate], list[Rejection], RoundReplies]:
    """One round of an update job: push each sampled node its message in ``contents``, collect until
    the deadline, screen. ``outstanding`` carries late messages from round to round; ``versions``:
    the downlink version each message brings its node to."""
    sampled = list(contents)
    ids = push(grid, contents, sampled, message_type)
    for message_id, node in zip(ids, sampled):
        outstanding[message_id] = Outstanding(node, server_round, shapes, (versions or {}).get(node))
    replies = collect(grid, outstanding, server_round, set(ids), timeout, max_staleness)
    accepted, rejected = accept_updates(replies, shapes, server_round, max_norm)
    return accepted, rejected, replies


@dataclass
class QueryReplies:
    """The sites that answered a statistics query, and why the others did not count."""

    replies: dict[str, Message] = field(default_factory=dict)
    failed: list[Rejection] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0
    answered_nodes: list[int] = field(default_factory=list)  # nodes that answered without an error
    failed_nodes: list[int] = field(default_factory=list)  # nodes whose job failed


def ask_sites(grid: Grid, nodes: list[int], content: RecordDict | dict[int, RecordDict], message_type: str,
              timeout: float = QUERY_TIMEOUT) -> QueryReplies:
    """Send one request (the same for all, or each node's own) to every site in ``nodes`` and wait
    (at most ``timeout`` seconds) for the replies."""
    start = time.perf_counter()
    ids = dict(zip(push(grid, content, nodes, message_type), nodes))
    sent = sum(_content_bytes(content[n] if isinstance(content, dict) else content) for n in nodes)
    pending, result = set(ids), QueryReplies(bytes_sent=sent)
    timeout = timeout if timeout > 0 else QUERY_TIMEOUT
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for msg in grid.pull_messages(list(pending)):
            message_id = msg.metadata.reply_to_message_id
            if message_id not in pending:
                continue
            pending.discard(message_id)
            site = reply_site(msg, ids[message_id])
            if msg.has_error():
                result.failed.append(Rejection(site, site_failure(msg)))
                result.failed_nodes.append(ids[message_id])
                continue
            result.answered_nodes.append(ids[message_id])
            if site in result.replies:
                result.failed.append(Rejection(site, "a second site answered under this name"))
            else:
                result.replies[site] = msg
        if pending:
            time.sleep(0.05)
    result.failed += [Rejection(f"node-{ids[m]}", f"no answer within {timeout:.0f} s") for m in sorted(pending)]
    for failure in result.failed:
        log.warning("%s: %s did not count: %s", message_type, failure.site, failure.reason)
    result.seconds = time.perf_counter() - start
    return result


def read_replies(answered: QueryReplies, what: str, read: Callable[[str, Message], T]) -> dict[str, T]:
    """Each answer read by ``read(site, msg)``; one that does not read is that site's failure,
    recorded in ``answered.failed`` and logged, never the run's."""
    values = {}
    for site, msg in answered.replies.items():
        try:
            values[site] = read(site, msg)
        except (InputError, ValueError) as exc:
            answered.failed.append(Rejection(site, f"malformed {what}: {exc}"))
            log.warning("%s: %s did not count: %s", what, site, answered.failed[-1].reason)
    return values


def _content_bytes(content: RecordDict) -> int:
    """Bytes of the parameters in a request (settings are a few hundred bytes beside them)."""
    return sum(record.count_bytes() for record in content.array_records.values())


@dataclass
class FederatedEvaluation:
    """A model scored on the sites' validation parts: merged metrics and who contributed what."""

    stats: EvalStats
    metrics: dict  # {} when no site had validation cases
    cases: dict[str, int]  # validation cases per site
    failed: list[Rejection]
    bytes_sent: int
    seconds: float
    answered_nodes: list[int] = field(default_factory=list)
    failed_nodes: list[int] = field(default_factory=list)

    def to_record(self) -> dict:
        return {"cases": self.cases, "failed": [f.__dict__ for f in self.failed], "bytes_sent": self.bytes_sent,
                "seconds": self.seconds}


def federated_evaluate(grid: Grid, nodes: list[int], content: RecordDict | dict[int, RecordDict], num_stages: int,
                       timeout: float = QUERY_TIMEOUT, gamma: float = 1.0) -> FederatedEvaluation:
    """Every site scores the model in ``content`` on its validation part and sends statistics back;
    they are checked and summed into the consortium's metrics."""
    answered = ask_sites(grid, nodes, content, "evaluate", timeout)
    stats = read_replies(answered, "evaluation statistics",
                         lambda site, msg: EvalStats.from_arrays(reply_arrays(msg, "stats"), num_stages))
    total = merge(list(stats.values()), num_stages)
    metrics = total.metrics(gamma) if total.cases else {}
    return FederatedEvaluation(total, metrics, {site: s.cases for site, s in stats.items()}, answered.failed,
                               answered.bytes_sent, answered.seconds, answered.answered_nodes, answered.failed_nodes)
