"""What a site lets out of a job, whatever the job: the last check before a reply leaves the site.

- A job that fails sends the coordinator one generic line with an incident id; the error itself,
  which may name a case, a label or a path, goes to the site's own log only (Flower forwards an
  exception's text to the coordinator verbatim).
- A site's node config can set floors the coordinator cannot lower: ``require-dp`` (train only
  with DP-SGD) and ``min-report-cases`` (no reply that sums fewer cases than this).
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Callable

from flwr.app import Context, Message, MetricRecord

from fedlite.errors import InputError

log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]


TAG = "[site] "  # marks the line meant for the coordinator inside whatever the runtime wraps it in


class SiteRefusal(Exception):
    """The site declines the job by its own policy; the reason names no case and goes out as it is."""

    def __init__(self, reason: str):
        super().__init__(TAG + reason)


class SiteJobFailed(Exception):
    """What the coordinator learns of a job that failed at the site."""

    def __init__(self, reason: str):
        super().__init__(TAG + reason)


@dataclass(frozen=True)
class SitePolicy:
    require_dp: bool = False
    min_report_cases: int = 0

    @classmethod
    def from_node(cls, node_config) -> "SitePolicy":
        node = {k: str(v).strip().lower() for k, v in node_config.items()}
        try:
            return cls(require_dp=node.get("require-dp", "false") in ("true", "1", "yes"),
                       min_report_cases=int(node.get("min-report-cases", "0")))
        except ValueError:
            raise InputError("min-report-cases in this site's node config must be a whole number") from None

    def check_request(self, msg: Message) -> None:
        config = msg.content.get("config")
        dp = str(config.get("dp", False)).lower() in ("true", "1") if config is not None else False
        if self.require_dp and msg.metadata.message_type.startswith("train") and not dp:
            raise SiteRefusal("this site trains only with DP-SGD (its node config sets require-dp)")

    def check_reply(self, reply: Message) -> None:
        if self.min_report_cases <= 0 or reply.has_error():
            return
        metrics = reply.content.get("metrics")
        counts = [int(metrics[k]) for k in ("num-examples", "validation-cases")
                  if isinstance(metrics, MetricRecord) and k in metrics]
        if any(count < self.min_report_cases for count in counts):
            raise SiteRefusal(f"this site reports nothing over fewer than {self.min_report_cases} cases "
                              "(its node config sets min-report-cases)")


def guarded(handler: Handler) -> Handler:
    """``handler`` with the site's policy applied and its failures kept at the site."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            policy = SitePolicy.from_node(context.node_config)
            policy.check_request(msg)
            reply = handler(msg, context)
            policy.check_reply(reply)
            return reply
        except SiteRefusal as refusal:
            log.warning("%s refused: %s", msg.metadata.message_type, refusal)
            raise
        except Exception as exc:
            incident = uuid.uuid4().hex[:12]
            log.error("%s failed (incident %s)", msg.metadata.message_type, incident, exc_info=True)
            kind = "invalid data or settings" if isinstance(exc, InputError) else f"an error ({type(exc).__name__})"
            raise SiteJobFailed(f"{msg.metadata.message_type} stopped at the site on {kind}; incident {incident} "
                                "in the site's log") from None

    return run
