"""The global model sent as compressed changes: each site receives what changed since the version it
holds, through the update codec, instead of the whole model every round.

The coordinator keeps one reference copy θ̂: what every up-to-date site holds. Each time the global
model changes, the change θ − θ̂ is encoded (top-k + int8) and θ̂ advances by exactly what was
encoded, so what was left out stays in θ − θ̂ and goes in a later version: error feedback on the
coordinator's side, with one copy of the model however many sites there are. A site keeps its own
copy of θ̂ with its version; a message brings it from the version the coordinator knows it holds to
the newest, carrying every change in between (a site that skipped rounds catches up), and a site
whose version is unknown or older than the kept changes gets θ̂ whole. A site's copy is θ̂ to float
tolerance, never a drifting approximation of it.

Tensors that join the model that travels (the encoders when they unfreeze) hold values every site
built itself from the run's config, proven equal by the frozen-weight fingerprint until then: they
are seeded from the site's own model, checked against a hash of the coordinator's values, rather
than sent.

Evaluation messages take the same path, so sites score the copy they hold. Sites train from θ̂,
which trails θ by what is still to be sent: stable while a round's update is small beside what
top-k sends per round, as for any error feedback on the model. θ̂ is also the run's model of record
(checkpoints, the server test): θ applies updates computed on older copies, so it runs ahead of
what was validated, and late in a run it can overshoot (bench/results/converged-tiny-cpu). A
resumed run starts from θ̂; what θ held beyond it is dropped.

numpy only on the site's side, like the codec.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from fedlite.errors import InputError
from fedlite.federated.compress import SEPARATOR, decode_update, encode_update, pack_encoded, unpack_encoded

# message config keys
VERSION, BASE, SEEDS = "downlink-version", "downlink-base", "downlink-seeds"
FULL = -1  # BASE of a message that carries θ̂ whole
STEP_SEPARATOR = "@"  # "<version>@codec::<part>": one kept change of the chain, packed
STATE = "fedlite-downlink"  # the site's copy, in its Flower context state
KEPT_VERSIONS = 16  # changes kept: a training round and an evaluation each make one


def values_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over names and float32 bytes, in name order: seeded tensors are checked by it."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


@dataclass
class _Change:
    version: int
    packed: dict[str, np.ndarray]  # the change as it travels (``pack_encoded``), packed once for every site
    seeded: list[str]  # tensors that joined with this version, seeded from each site's own model
    seed_digest: str  # values_digest of the coordinator's values of them
    dropped: list[str]  # tensors that stopped travelling


@dataclass
class DownlinkStream:
    """The coordinator's side: the reference copy θ̂, its kept changes and what each node holds."""

    topk_fraction: float
    kept_versions: int = KEPT_VERSIONS
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = 0
    changes: deque = field(default_factory=deque)
    node_versions: dict[int, int] = field(default_factory=dict)

    def advance(self, target: dict[str, np.ndarray], topk_fraction: float | None = None) -> None:
        """A new version towards ``target`` (the global model's tensors that travel now), its
        change sent at ``topk_fraction`` (default: the stream's)."""
        new = sorted(set(target) - set(self.reference))
        dropped = sorted(set(self.reference) - set(target))
        for name in dropped:
            del self.reference[name]
        # the first version goes to every site whole; later newcomers are seeded where they are
        seeded = new if self.version > 0 else []
        for name in new:
            self.reference[name] = np.array(target[name], dtype=np.float32)
        changed = {n: np.asarray(target[n], np.float32) - self.reference[n] for n in target}
        encoded, _ = encode_update(changed, None, topk_fraction or self.topk_fraction)
        # θ̂ advances by the decoded change, the sites' own arithmetic, so both copies round alike
        for name, step in decode_update(encoded).items():
            self.reference[name] += step
        self.version += 1
        self.changes.append(_Change(self.version, pack_encoded(encoded), seeded,
                                    values_digest({n: target[n] for n in seeded}) if seeded else "", dropped))
        while len(self.changes) > self.kept_versions:
            self.changes.popleft()

    def message_for(self, node: int) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, config) that bring ``node`` from the version it holds to the newest."""
        held = self.node_versions.get(node)
        oldest = self.changes[0].version if self.changes else self.version + 1
        if held is None or held < oldest - 1 or held > self.version:
            return dict(self.reference), {VERSION: self.version, BASE: FULL}
        chain = [c for c in self.changes if c.version > held]
        arrays = {f"{c.version}{STEP_SEPARATOR}{key}": value for c in chain for key, value in c.packed.items()}
        steps = {str(c.version): {"seeded": c.seeded, "seed-digest": c.seed_digest, "dropped": c.dropped}
                 for c in chain}
        return arrays, {VERSION: self.version, BASE: held, SEEDS: json.dumps(steps)}

    def residual_norm(self, target: dict[str, np.ndarray]) -> float:
        """‖θ − θ̂‖₂: how far what the sites hold trails the global model (what is still to be sent)."""
        return float(np.sqrt(sum(float(np.sum((np.asarray(target[n], np.float32) - self.reference[n]) ** 2))
                                 for n in target if n in self.reference)))

    def delivered(self, node: int, version: int) -> None:
        """``node`` answered a message that carried ``version``: it holds it."""
        self.node_versions[node] = max(version, self.node_versions.get(node, FULL))

    def forget(self, node: int) -> None:
        """``node`` failed a job: what it holds is unknown, so it gets θ̂ whole next time."""
        self.node_versions.pop(node, None)


# ------------------------------------------------------------------------------------- at the site


def apply_downlink(arrays: dict[str, np.ndarray], config: dict, state: tuple[int, dict[str, np.ndarray]] | None,
                   own_values) -> tuple[int, dict[str, np.ndarray]]:
    """The site's copy after this message: (version, θ̂). ``state`` is the copy it held (None: none);
    ``own_values(names)`` yields candidate values of tensors to seed from this site's own models
    (e.g. the model in use, then a freshly built initial one); the first that matches the
    coordinator's hash is taken."""
    version, base = int(config[VERSION]), int(config[BASE])
    if base == FULL:
        return version, {n: np.array(v, dtype=np.float32) for n, v in arrays.items()}
    if state is None or not base <= state[0] <= version:
        held = "none" if state is None else f"version {state[0]}"
        raise InputError(f"this site holds {held} of the global model; the message continues from version {base}",
                         hint="the coordinator sends the whole model next time")
    held, copy = state[0], {n: v.copy() for n, v in state[1].items()}
    try:
        steps = json.loads(str(config[SEEDS]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise InputError(f"the message's {SEEDS} is missing or not JSON ({exc})") from None
    by_step: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        step, sep, rest = key.partition(STEP_SEPARATOR)
        if not sep or not step.isdigit() or SEPARATOR not in rest:
            raise InputError(f"downlink key {key!r} is not <version>{STEP_SEPARATOR}codec{SEPARATOR}<part>")
        by_step.setdefault(int(step), {})[rest] = value
    for step in range(held + 1, version + 1):
        info = steps.get(str(step)) if isinstance(steps, dict) else None
        if not isinstance(info, dict) or not {"seeded", "seed-digest", "dropped"} <= set(info):
            raise InputError(f"the message lacks the change to version {step}")
        for name in info["dropped"]:
            copy.pop(name, None)
        if info["seeded"]:
            own = next((c for c in own_values(list(info["seeded"])) if values_digest(c) == info["seed-digest"]),
                       None)
            if own is None:
                raise InputError("this site's own values of the tensors that joined the model differ from the "
                                 "coordinator's", hint="sites and coordinator need the same preset, seed and weights")
            copy.update({n: np.array(v, dtype=np.float32) for n, v in own.items()})
        expected = {n: v.shape for n, v in copy.items()}
        if step not in by_step:
            raise InputError(f"the message lacks the arrays of the change to version {step}")
        for name, change in decode_update(unpack_encoded(by_step[step]), expected).items():
            copy[name] += change
    return version, copy


def received_parameters(msg, context, own_values) -> dict[str, np.ndarray]:
    """The global parameters a site starts from: the message's own, or (when they travel as changes)
    the site's copy brought up to date by them and kept in its Flower context for the next message."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    config = dict(msg.content["config"])
    if VERSION not in config:
        return arrays
    held = None
    if STATE in context.state and STATE + "-version" in context.state:
        held = (int(context.state[STATE + "-version"]["version"]),
                {name: array.numpy() for name, array in context.state[STATE].items()})
    version, copy = apply_downlink(arrays, config, held, own_values)
    context.state[STATE] = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in copy.items()})
    context.state[STATE + "-version"] = ConfigRecord({"version": version})
    return {name: value.copy() for name, value in copy.items()}
