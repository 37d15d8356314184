"""The bundle: the contract between export and the hospital agent.

A directory with three ONNX graphs, the head weights, the tokenizer and ``bundle.json`` (what the
files are, how to feed them, how the bundle scored against its teacher, SHA-256 of every file).
``bundle.json`` carries a hash of its own content too, so a changed label name is caught as surely
as a changed weight. Reading and verifying needs only the standard library: the agent imports this
module on a server without torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from fedlite.atomic import json_text
from fedlite.errors import InputError, Problem

log = logging.getLogger(__name__)

FORMAT = "fedlite-bundle/1"
MANIFEST = "bundle.json"
HEAD_WEIGHTS = "head.safetensors"
SELF_HASH = "content_sha256"
ENCODER_GRAPHS = ("image_encoder", "text_encoder")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_hash(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_bundle(directory: Path, meta: dict, files: dict | None = None, signing_key=None) -> dict:
    """Hash every file in ``directory`` into ``meta['files']`` and write ``bundle.json``; with an
    Ed25519 ``signing_key`` also sign it (``export/signing.py``).

    ``files``: hashes from an earlier seal of the same, unchanged files, when only the manifest's
    content changes (the parity report is added after the sealed bundle was verified).
    """
    from fedlite.export.signing import SIGNATURE, sign_manifest

    if files is None:
        paths = sorted(p for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST, SIGNATURE))
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}
    meta = json.loads(json_text({**meta, "format": FORMAT, "files": files}))  # as it will read back
    meta[SELF_HASH] = _content_hash(meta)
    (directory / MANIFEST).write_text(json_text(meta, indent=2) + "\n", encoding="utf-8")
    if signing_key is not None:
        sign_manifest(directory, signing_key, MANIFEST)
    elif (directory / SIGNATURE).exists():
        (directory / SIGNATURE).unlink()  # it signed other bytes
    return meta


def encoder_fingerprint(meta: dict) -> str:
    """SHA-256 over the encoders, tokenizer and preprocessing of a bundle: equal fingerprints give
    equal embeddings, whatever the head."""
    files = meta["files"]
    parts = [files[meta["graphs"][g]["file"]]["sha256"] for g in ENCODER_GRAPHS]
    parts.append(files[meta["tokenizer"]]["sha256"])
    parts.append(json.dumps(meta["preprocessing"], sort_keys=True))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def read_bundle_meta(bundle: str | Path) -> dict:
    """``bundle.json`` parsed and its own hash checked (the files are checked by ``verify_bundle``)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise InputError("bundle directory not found", path=bundle)
    if not path.is_file():
        raise InputError(f"not a fedlite bundle: no {MANIFEST}", path=bundle)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"corrupt bundle manifest: {exc}", path=path,
                         hint="the bundle was changed after export; export it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(f"unsupported bundle format {found!r}", path=path, hint=f"this fedlite reads {FORMAT}")
    if meta.get(SELF_HASH) != _content_hash(meta):
        raise InputError("bundle manifest was modified after export (its content hash does not match)",
                         path=path, hint="export the bundle again or restore it from a trusted copy")
    problems = structure_problems(meta)
    if problems:
        raise InputError([Problem(p, path=path) for p in problems])
    return meta


# What a runtime may be asked to allocate: a bundle asking for more is refused, not obeyed.
PREPROCESSING_RANGES = {"image_size": (16, 1024), "max_length": (1, 4096)}


def structure_problems(meta: dict) -> list[str]:
    """Why ``meta`` cannot be trusted to point the runtime at its own files with sane settings:
    every file it refers to is a plain name among its hashed files; sizes are in range."""
    problems = []
    files = meta.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
            for v in files.values()):
        return ["'files' must map each file name to its sha256 and bytes"]
    graphs = meta.get("graphs")
    referred = {"tokenizer": meta.get("tokenizer")}
    if meta.get("head_weights") is not None:
        referred["head_weights"] = meta["head_weights"]
    if not isinstance(graphs, dict) or not all(isinstance(g, dict) for g in graphs.values()):
        problems.append("'graphs' must map each graph to its entry")
    else:
        referred.update({f"graphs.{name}.file": g.get("file") for name, g in graphs.items()})
    for key, name in referred.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            problems.append(f"{key} must be a plain file name inside the bundle, got {name!r}")
        elif name not in files:
            problems.append(f"{key} names {name!r}, which the manifest does not hash")
    prep = meta.get("preprocessing")
    if not isinstance(prep, dict):
        return problems + ["'preprocessing' is missing"]
    for key, (low, high) in PREPROCESSING_RANGES.items():
        value = prep.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"preprocessing.{key} must be a whole number in {low}..{high}, got {value!r}")
    for key in ("mean", "std"):
        value = prep.get(key)
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
                or (key == "std" and not all(v > 0 for v in value))):
            problems.append(f"preprocessing.{key} must be three finite numbers" + (" above 0" if key == "std" else ""))
    return problems


def verify_bundle(bundle: str | Path, public_key=None) -> dict:
    """Check every file's SHA-256 against the manifest; refuse the bundle naming each bad file.
    ``public_key`` (a path or an Ed25519 public key): the manifest must carry its holder's signature."""
    from fedlite.export.signing import SIGNATURE, check_signature, load_public_key

    bundle = Path(bundle)
    if public_key is not None:
        if not (bundle / MANIFEST).is_file():
            read_bundle_meta(bundle)  # says what is missing
        key = load_public_key(public_key) if isinstance(public_key, (str, Path)) else public_key
        check_signature(bundle, key, MANIFEST)
    meta = read_bundle_meta(bundle)
    problems = []
    for name, expected in meta["files"].items():
        path = bundle / name
        if Path(name).name != name:
            problems.append(Problem(f"manifest names a file outside the bundle: {name!r}", path=bundle / MANIFEST))
        elif not path.is_file():
            problems.append(Problem("file listed in the bundle manifest is missing", path=path))
        elif path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            problems.append(Problem("file does not match its SHA-256 in the bundle manifest (tampered or corrupt)",
                                    path=path, hint="export the bundle again or restore it from a trusted copy"))
    if problems:
        raise InputError(problems)
    extra = sorted(p.name for p in bundle.iterdir() if p.name not in (MANIFEST, SIGNATURE, *meta["files"]))
    if extra:
        raise InputError(f"the bundle holds files its manifest does not hash: {', '.join(extra)}", path=bundle,
                         hint="remove them, or export the bundle again")
    return meta
