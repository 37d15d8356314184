import json

import pytest

from fedlite.bench.federated import summarize, training_flops_per_sample


def test_summary_skips_the_start_up_round_and_extrapolates_to_the_paper_workload():
    rounds = [
        {"site_train_seconds": {"a": 50.0}, "samples_trained": 10, "round_seconds": 100.0},
        {"site_train_seconds": {"a": 8.0, "b": 10.0}, "samples_trained": 180, "round_seconds": 20.0},
        {"site_train_seconds": {"a": 9.0, "b": 9.0}, "samples_trained": 180, "round_seconds": 20.0},
    ]
    report = summarize(rounds, flops_per_sample=1e12, sites=2)
    assert report["timed_rounds"] == 2
    assert report["samples_per_second"] == pytest.approx(360 / 36)
    assert report["achieved_tflops"] == pytest.approx(10.0)
    assert report["share_outside_training"] == pytest.approx(1 - 36 / 40)
    assert report["paper_workload_minutes"] == pytest.approx(20 * 100 * 5 / 60)


def test_sites_training_side_by_side_count_once():
    rounds = [{"site_train_seconds": {"a": 9.0, "b": 9.0}, "site_training_seconds": 9.5, "samples_trained": 180,
               "round_seconds": 10.0}]
    report = summarize(rounds, flops_per_sample=1e12, sites=2)
    assert report["samples_per_second"] == pytest.approx(180 / 9.5)
    assert report["share_outside_training"] == pytest.approx(0.05)


def test_training_flops_count_both_encoders():
    both = training_flops_per_sample("tiny", "both", mean_tokens=100)
    image = training_flops_per_sample("tiny", "image", mean_tokens=100)
    assert both > image > 0


def test_the_frozen_round_bench_times_both_paths_and_reads_the_cache_once_every_view_is_in(synth_split, tmp_path):
    from click.testing import CliRunner

    from fedlite.bench.frozen_rounds import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--data", str(synth_split.out_dir), "--preset", "tiny", "--rounds", "3",
                                       "--views", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "frozen_rounds.json").read_text())
    rows = report["rounds"]
    assert [r["all_views_cached"] for r in rows] == [False, False, True]  # views 0, 1, then read back
    assert rows[2]["embed_seconds"] == 0 and rows[0]["embed_seconds"] > 0
    assert all(r["uncached_seconds"] > 0 and r["cached_seconds"] > 0 for r in rows)
    assert report["median_speedup_all_cached"] == rows[2]["speedup"]
    assert "| 3 |" in (out / "frozen_rounds.md").read_text()
    assert set(report["validation"]) == {"uncached", "cached"}
    assert all(0 <= s["accuracy"] <= 1 and s["cases"] > 0 for s in report["validation"].values())
