"""Who made a bundle: an Ed25519 signature over its manifest.

bundle.json's hashes are a checksum anyone can recompute after editing a bundle; a signature made
with the consortium's private key is not. ``bundle.sig`` holds the signature of bundle.json's exact
bytes (which hash every other file), so a bundle verified against a pinned public key is the one the
key's holder sealed. Keys are standard PEM: ``openssl genpkey -algorithm ed25519 -out key.pem`` and
``openssl pkey -in key.pem -pubout -out key.pub`` work, as does ``fedlite export keygen``.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlite.atomic import atomic_write_text
from fedlite.errors import InputError

SIGNATURE = "bundle.sig"


def generate_key_pair(private_path: Path, public_path: Path) -> None:
    """A new Ed25519 pair in PEM; the private key owner-only. Existing files are never replaced."""
    for path in (private_path, public_path):
        if Path(path).exists():
            raise InputError("refusing to replace an existing key file", path=path)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    Path(public_path).write_bytes(public)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    return _load(path, private=True)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return _load(path, private=False)


def _load(path: str | Path, private: bool):
    """An Ed25519 key from a PEM file; anything else is refused with the command that makes one."""
    path, kind = Path(path), "private" if private else "public"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the key: {exc.strerror}", path=path) from None
    try:
        key = serialization.load_pem_private_key(data, password=None) if private else \
            serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InputError(f"not a PEM {kind} key ({exc})", path=path) from None
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise InputError(f"not an Ed25519 {kind} key ({type(key).__name__})", path=path,
                         hint="openssl genpkey -algorithm ed25519 -out key.pem" if private
                         else "openssl pkey -in key.pem -pubout -out key.pub")
    return key


def sign_manifest(bundle: Path, key: Ed25519PrivateKey, manifest: str) -> None:
    """Write ``bundle.sig`` for the manifest's current bytes."""
    signature = key.sign((Path(bundle) / manifest).read_bytes())
    atomic_write_text(Path(bundle) / SIGNATURE, base64.b64encode(signature).decode() + "\n")


def check_signature(bundle: Path, key: Ed25519PublicKey, manifest: str) -> None:
    """Refuse a bundle that is unsigned or not signed by ``key``'s holder."""
    path = Path(bundle) / SIGNATURE
    if not path.is_file():
        raise InputError("the bundle is not signed, and a public key is pinned: refused", path=bundle,
                         hint="install a bundle exported with --sign by the key's holder")
    try:
        signature = base64.b64decode(path.read_text().strip(), validate=True)
        key.verify(signature, (Path(bundle) / manifest).read_bytes())
    except (InvalidSignature, ValueError, UnicodeDecodeError):
        raise InputError("the bundle's signature does not verify with the pinned public key: refused",
                         path=path, hint="the bundle was changed or signed by someone else") from None
