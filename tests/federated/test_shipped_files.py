"""What the coordinator ships to sites (a teacher, a bundle under test) is kept only if it matches its digest."""

import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedlite.atomic import published_once
from fedlite.errors import InputError
from fedlite.federated.shipped_files import cached_shipment, pack_files


@pytest.fixture
def shipment(tmp_path):
    source = tmp_path / "teacher"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"\x00\x01weights" * 100)
    (source / "config.json").write_text('{"format": "x"}')
    return pack_files(source)


def test_a_shipment_is_cached_once_owner_only_and_found_by_its_digest(shipment, tmp_path):
    arrays, digest = shipment
    path = cached_shipment(tmp_path / "cache", "teacher", digest, arrays)
    assert (path / "config.json").read_text() == '{"format": "x"}'
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in path.iterdir())
    assert cached_shipment(tmp_path / "cache", "teacher", digest) == path  # later messages name the digest only


def test_changed_bytes_a_missing_shipment_and_odd_names_are_refused(shipment, tmp_path):
    arrays, digest = shipment
    tampered = {**arrays, "config.json": np.frombuffer(b'{"format": "y"}', np.uint8)}
    with pytest.raises(InputError, match="does not match its digest"):
        cached_shipment(tmp_path / "cache", "teacher", digest, tampered)
    with pytest.raises(InputError, match="holds no teacher"):
        cached_shipment(tmp_path / "cache", "teacher", digest)
    for name in ("../evil", "/etc/passwd", ".hidden"):
        with pytest.raises(InputError, match="may not be called"):
            cached_shipment(tmp_path / "cache", "teacher", digest, {name: arrays["config.json"]})
    with pytest.raises(InputError, match="SHA-256"):
        cached_shipment(tmp_path / "cache", "teacher", "../" * 10)
    path = cached_shipment(tmp_path / "cache", "teacher", digest, arrays)
    (path / "config.json").write_text("changed on disk")
    with pytest.raises(InputError, match="holds no teacher"):  # a cached copy changed since is not used
        cached_shipment(tmp_path / "cache", "teacher", digest)


def test_sites_sharing_a_cache_can_write_one_shipment_at_once(shipment, tmp_path):
    arrays, digest = shipment
    cache = tmp_path / "cache"
    target = cache / f"teacher-{digest[:32]}"
    with published_once(target) as staged:  # another site publishes while this one writes
        (staged / "config.json").write_text("second copy")
        target.mkdir(parents=True)
        (target / "config.json").write_text("first copy")
    assert (target / "config.json").read_text() == "first copy"
    assert [p.name for p in cache.iterdir()] == [target.name]  # the second copy is cleaned up

    barrier = threading.Barrier(8)

    def write(cache_dir):
        barrier.wait()
        return cached_shipment(cache_dir, "teacher", digest, arrays)

    for attempt in range(20):  # a race: a single attempt showed it a third of the time before the fix
        shared = tmp_path / f"shared-{attempt}"
        with ThreadPoolExecutor(8) as pool:
            paths = set(pool.map(write, [shared] * 8))
        assert len(paths) == 1 and (paths.pop() / "config.json").read_text() == '{"format": "x"}'
        assert [p.name for p in shared.iterdir()] == [target.name]
