"""A hospital's identity at the SuperLink: Flower's SuperNode authentication key pair.

A SuperLink started with ``--enable-supernode-auth`` admits only SuperNodes whose public key the
coordinator registered (``flwr supernode register KEY.pub``); every request a SuperNode makes is
signed with its private key. Flower wants an elliptic-curve key (NIST curve) in OpenSSH format,
what ``ssh-keygen -t ecdsa -b 384`` writes; ``fedlite agent keygen`` makes the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedlite.errors import InputError, Problem

KEYGEN_HINT = "make a pair with 'fedlite agent keygen' (or ssh-keygen -t ecdsa -b 384 -N '' -f node_key)"
REGISTER_HINT = "the coordinator registers its public key: flwr supernode register NODE_KEY.pub CONNECTION"


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Path
    public_key_openssh: str  # derived from the private key: what the coordinator registers
    curve: str


def generate_node_key_pair(private_path: Path, public_path: Path | None = None) -> NodeIdentity:
    """A new P-384 pair: the private key owner-only (OpenSSH format), the public key beside it
    (``.pub``). Existing files are never replaced."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path is not None else default_public_key(private_path)
    for path in (private_path, public_path):
        if path.exists():
            raise InputError("refusing to replace an existing key file", path=path,
                             hint="register the existing pair, or choose another path")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = _openssh_public(key.public_key())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    public_path.write_text(public + "\n")
    return NodeIdentity(private_path, public, key.curve.name)


def default_public_key(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def load_node_identity(private_path: Path, public_path: Path | None = None, *,
                       field: str = "node.private_key", source: Path | None = None) -> NodeIdentity:
    """The pair as Flower will use it; a public key given beside it must be its own. Errors name the
    config field (or install option) and the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path = Path(private_path)
    try:
        key = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    except OSError as exc:
        raise InputError(Problem(f"cannot read the node key {private_path}: {exc.strerror}", path=source,
                                 field=field, hint=KEYGEN_HINT)) from None
    except (ValueError, TypeError) as exc:
        raise InputError(Problem(f"{private_path} is not an unencrypted OpenSSH private key ({exc})", path=source,
                                 field=field, hint=KEYGEN_HINT)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(Problem(f"{private_path} is a {type(key).__name__.removeprefix('_')}, Flower's node "
                                 "authentication needs an elliptic-curve (ECDSA) key", path=source, field=field,
                                 hint=KEYGEN_HINT))
    derived = _openssh_public(key.public_key())
    if public_path is not None:
        public_field = field.replace("private", "public")
        try:
            given = serialization.load_ssh_public_key(Path(public_path).read_bytes())
        except OSError as exc:
            raise InputError(Problem(f"cannot read {public_path}: {exc.strerror}", path=source,
                                     field=public_field)) from None
        except (ValueError, TypeError, IndexError) as exc:
            raise InputError(Problem(f"{public_path} is not an OpenSSH public key ({exc})", path=source,
                                     field=public_field)) from None
        if _openssh_public(given) != derived:
            raise InputError(Problem(f"{public_path} is not the public key of {private_path}", path=source,
                                     field=public_field, hint="configure (and register) the matching pair"))
    return NodeIdentity(private_path, derived, key.curve.name)


def require_node_identity(config, source: Path | None = None) -> NodeIdentity | None:
    """The agent's identity, required unless the connection is ``insecure`` (tests and labs: no TLS,
    so Flower cannot authenticate nodes at all). ``config``: an ``AgentConfig``."""
    node = config.node
    if config.superlink.insecure:
        return None
    if node.private_key is None:
        raise InputError(missing_identity_problem(source))
    return load_node_identity(node.private_key, node.public_key, source=source)


def missing_identity_problem(source: Path | None, field: str = "node.private_key") -> Problem:
    return Problem("no node key: a SuperLink that authenticates SuperNodes (--enable-supernode-auth) refuses "
                   "this node, and any node could speak for this hospital at one that does not",
                   path=source, field=field, hint=f"{KEYGEN_HINT}; {REGISTER_HINT}")


def _openssh_public(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
