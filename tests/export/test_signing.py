"""A bundle proves who made it: Ed25519 signatures over bundle.json, pinned public keys, and a
manifest that can only point at its own hashed files with sane settings."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from fedlite.cli import main
from fedlite.errors import InputError
from fedlite.export.bundle import MANIFEST, _content_hash, seal_bundle, verify_bundle
from fedlite.export.signing import SIGNATURE, generate_key_pair, load_private_key


@pytest.fixture
def keys(tmp_path):
    generate_key_pair(tmp_path / "key.pem", tmp_path / "key.pub")
    generate_key_pair(tmp_path / "other.pem", tmp_path / "other.pub")
    return tmp_path


def _signed_copy(bundle, tmp_path, key):
    copy = tmp_path / "signed"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / MANIFEST).read_text())
    seal_bundle(copy, {k: v for k, v in meta.items() if k not in ("files", "content_sha256")},
                signing_key=load_private_key(key))
    return copy


def _reseal(bundle, change):
    """What an attacker can do without the key: edit the manifest and recompute every hash."""
    meta = json.loads((bundle / MANIFEST).read_text())
    change(meta)
    meta["content_sha256"] = _content_hash(meta)
    (bundle / MANIFEST).write_text(json.dumps(meta, indent=2))


def test_a_signed_bundle_verifies_with_its_key_and_no_other(teacher_bundle, tmp_path, keys):
    signed = _signed_copy(teacher_bundle, tmp_path, keys / "key.pem")
    assert verify_bundle(signed, keys / "key.pub")["bundle_version"] >= 1
    with pytest.raises(InputError, match="does not verify with the pinned public key"):
        verify_bundle(signed, keys / "other.pub")
    with pytest.raises(InputError, match="not signed"):
        verify_bundle(teacher_bundle, keys / "key.pub")
    assert (keys / "key.pem").stat().st_mode & 0o077 == 0


def test_labels_swapped_and_resealed_pass_the_checksum_but_not_the_signature(teacher_bundle, tmp_path, keys):
    signed = _signed_copy(teacher_bundle, tmp_path, keys / "key.pem")
    _reseal(signed, lambda meta: meta["label_names"].reverse())
    assert verify_bundle(signed)["label_names"][0] != json.loads((teacher_bundle / MANIFEST).read_text())[
        "label_names"][0]  # a checksum anyone can recompute
    with pytest.raises(InputError, match="signature does not verify"):
        verify_bundle(signed, keys / "key.pub")


def test_keys_made_by_openssl_work(teacher_bundle, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "k.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "k.pem"), "-pubout", "-out", str(tmp_path / "k.pub")],
                   check=True)
    signed = _signed_copy(teacher_bundle, tmp_path, tmp_path / "k.pem")
    verify_bundle(signed, tmp_path / "k.pub")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["graphs"]["head"].update(file="../evil/head.onnx"), "plain file name"),
    (lambda m: m["graphs"]["head"].update(file="/tmp/head.onnx"), "plain file name"),
    (lambda m: m.update(tokenizer="/etc/passwd"), "plain file name"),
    (lambda m: m.update(tokenizer="notes.json"), "does not hash"),
    (lambda m: m["preprocessing"].update(image_size=100000), "image_size must be a whole number in 16..1024"),
    (lambda m: m["preprocessing"].update(std=[0.5, 0.0, 0.5]), "std must be three finite numbers above 0"),
    (lambda m: m.update(files={"a": "b"}), "'files' must map"),
])
def test_a_manifest_that_points_outside_its_hashed_files_or_asks_too_much_is_refused(teacher_bundle, tmp_path,
                                                                                      change, message):
    bundle = tmp_path / "b"
    shutil.copytree(teacher_bundle, bundle)
    _reseal(bundle, change)
    with pytest.raises(InputError, match=message):
        verify_bundle(bundle)


def test_a_file_the_manifest_does_not_hash_is_refused(teacher_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(teacher_bundle, bundle)
    (bundle / "extra.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="does not hash: extra.onnx"):
        verify_bundle(bundle)


def test_the_cli_signs_verifies_and_refuses(teacher_bundle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export", "keygen", str(tmp_path / "k.pem")])
    assert result.exit_code == 0, result.output
    signed = _signed_copy(teacher_bundle, tmp_path, tmp_path / "k.pem")
    result = runner.invoke(main, ["export", "verify", str(signed), "--public-key", str(tmp_path / "k.pub")])
    assert result.exit_code == 0 and "signed by the key's holder" in result.output
    (signed / SIGNATURE).unlink()
    result = runner.invoke(main, ["export", "verify", str(signed), "--public-key", str(tmp_path / "k.pub")])
    assert result.exit_code != 0 and "not signed" in result.output
    result = runner.invoke(main, ["export", "keygen", str(tmp_path / "k.pem")])
    assert result.exit_code != 0 and "refusing to replace" in result.output


def test_predict_with_a_pinned_key_refuses_an_unsigned_bundle_and_uses_a_signed_one(teacher_bundle, teacher_run,
                                                                                   tmp_path, keys):
    from fedlite.data.manifest import read_dataset

    test = read_dataset(teacher_run[1] / "test")
    case = ["--image", str(test.image_path(test.cases[0])), "--text", test.cases[0].text]
    runner = CliRunner()
    refused = runner.invoke(main, ["predict", str(teacher_bundle), *case, "--public-key", str(keys / "key.pub")])
    assert refused.exit_code != 0 and "not signed" in refused.output
    signed = _signed_copy(teacher_bundle, tmp_path, keys / "key.pem")
    used = runner.invoke(main, ["predict", str(signed), *case, "--public-key", str(keys / "key.pub"), "--json"])
    assert used.exit_code == 0, used.output
