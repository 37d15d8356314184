"""Files that hold patient-derived data stay with their owner, and no two cases share a report."""

from __future__ import annotations

import stat

from fedlite.agents.explain_report import safe_case_name
from fedlite.atomic import owner_only_dir


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_two_case_ids_that_sanitise_alike_get_two_report_folders():
    names = {safe_case_name(case_id) for case_id in ("a/b", "a_b", "a b", "a\\b")}
    assert len(names) == 4 and "a_b" in names  # an id that needs no change keeps its name
    assert all("/" not in n and "\\" not in n and " " not in n for n in names)


def test_an_existing_lax_directory_becomes_owner_only(tmp_path):
    lax = tmp_path / "cache"
    lax.mkdir(mode=0o755)
    lax.chmod(0o755)
    assert _mode(owner_only_dir(lax)) == 0o700
    assert _mode(owner_only_dir(tmp_path / "new" / "reports")) == 0o700


def test_predictions_are_written_owner_only(teacher_bundle, teacher_run, tmp_path):
    from fedlite.agents.predict import predict_manifest
    from fedlite.agents.runtime import BundleRuntime

    out = tmp_path / "predictions.jsonl"
    predict_manifest(BundleRuntime(teacher_bundle), teacher_run[1] / "test", out, progress=False)
    assert _mode(out) == 0o600
