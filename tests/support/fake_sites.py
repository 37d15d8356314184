"""In-memory sites for driving the coordinator's round loop without Flower's runtime.

Each site answers a train message at once with the update that moves the global parameters
halfway to its own target, reported with its case count; one site can be made to send anything.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlite.federated.records import from_record, to_record

TARGETS = {1: ("site-a", 10, 1.0), 2: ("site-b", 30, 3.0), 3: ("site-c", 60, -2.0)}


class Reply:
    def __init__(self, reply_to: str, content: RecordDict):
        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to})()
        self.content = content

    def has_error(self) -> bool:
        return False


class Outgoing:
    """A coordinator's message as the fake sites see it (Flower's Message needs a running Grid)."""

    def __init__(self, content: RecordDict, dst_node_id: int, message_type: str):
        self.content = content
        self.metadata = type("Metadata", (), {"dst_node_id": dst_node_id, "message_type": message_type})()


@pytest.fixture(autouse=True)
def offline_messages(monkeypatch):
    monkeypatch.setattr("fedlite.federated.rounds.Message", Outgoing)


class ReplyingGrid:
    """A Grid whose sites answer every message at once with ``answer(node, msg)``; site ``forged``'s
    answer goes through ``forge`` first."""

    def __init__(self, forged: int | None = None, forge=None):
        self.forged, self.forge, self.replies, self.pushed, self.types = forged, forge, {}, 0, []

    def get_node_ids(self):
        return list(TARGETS)

    def answer(self, node: int, msg) -> RecordDict:
        raise NotImplementedError

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.pushed += 1
            node, message_id = msg.metadata.dst_node_id, f"m{self.pushed}"
            self.types.append(msg.metadata.message_type)
            content = self.answer(node, msg)
            if node == self.forged and self.forge is not None:
                content = self.forge(content)
            self.replies[message_id] = Reply(message_id, content)
            ids.append(message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


class Sites(ReplyingGrid):
    """Sites that train instantly: Δ = (target − w) / 2, reported with their case counts."""

    def __init__(self, poisoned: int | None = None, poison=lambda delta: np.full_like(delta, np.nan),
                 forge=None):
        """Site ``poisoned`` sends ``poison(honest update)``, or the reply ``forge(honest reply)``."""
        super().__init__(poisoned, forge)
        self.poison = poison

    def answer(self, node: int, msg) -> RecordDict:
        site, cases, target = TARGETS[node]
        w = from_record(msg.content["arrays"])["w"]
        honest = ((target - w) / 2).astype(np.float32)
        poisoned = node == self.forged and self.forge is None
        sent = self.poison(honest) if poisoned else honest  # the poison keeps its dtype
        return RecordDict({
            "arrays": to_record({"w": sent}),
            "metrics": MetricRecord({"num-examples": cases, "train-loss": float(np.abs(honest).mean()),
                                     "train-seconds": 0.0}),
            "info": ConfigRecord({"site": site})})
