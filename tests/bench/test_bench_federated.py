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
