"""`fedlite bench`: statistics, per-configuration process isolation, and the report writers."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fedlite.bench.agent_bench import AgentBenchSettings, top10_overlap
from fedlite.bench.report import markdown, write_report
from fedlite.bench.runner import BenchSettings, Variant, measure, run_bench, timing_cases
from fedlite.bench.stats import latency_summary, ratio, repeated_summary
from fedlite.cli import main

TINY = BenchSettings(threads=(1,), batches=(1, 2), runs=5, repeats=2, warmup=2, cases=4)


def test_latency_percentiles_match_numpy_on_known_samples():
    samples = np.arange(1, 101, dtype=float)
    s = latency_summary(samples)
    assert (s["p50"], s["p90"], s["p95"], s["p99"]) == pytest.approx((50.5, 90.1, 95.05, 99.01))
    assert s["mean"] == 50.5 and s["std"] == pytest.approx(np.std(samples, ddof=1)) and s["n"] == 100
    rng = np.random.default_rng(0)
    skewed = rng.lognormal(size=1000)
    assert latency_summary(skewed)["p99"] == pytest.approx(np.percentile(skewed, 99))
    with pytest.raises(ValueError):
        latency_summary([])


def test_repeats_are_pooled_and_their_spread_reported():
    s = repeated_summary([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
    assert s["p50_per_repeat"] == [2.0, 4.0] and s["p50_spread"] == pytest.approx(1.0)
    assert s["n"] == 6 and s["p50"] == pytest.approx(np.percentile([1, 2, 3, 2, 4, 6], 50))
    assert ratio(10.0, 2.0) == 5.0 and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


def test_memory_is_measured_in_a_fresh_process_of_its_own(teacher_bundle, teacher_run):
    ballast = np.ones(600 * 2**20 // 8)  # the parent holds 600 MB; a child must not report it
    cases = timing_cases(teacher_run[1] / "test", 3)
    result = measure(Variant("b", "bundle", teacher_bundle, "", 0), 1, cases, TINY)
    assert ballast.sum() > 0
    assert result["heavy_modules_loaded"] == []
    assert 20 < result["peak_rss_mb"] < 400
    assert result["latency_ms"]["n"] == TINY.runs * TINY.repeats
    assert [t["batch"] for t in result["throughput"]] == [1, 2]
    torch_result = measure(Variant("t", "torch", teacher_run[0], "", 0), 1, cases, TINY)
    assert "torch" in torch_result["heavy_modules_loaded"]
    assert torch_result["peak_rss_mb"] > result["peak_rss_mb"]


def test_bench_report_compares_the_bundle_with_every_teacher_baseline(teacher_bundle, teacher_run, tmp_path):
    agent = AgentBenchSettings(explain_cases=2, max_evals=40, edge_epochs=1, ram_budget_bytes=8 * 2**30)
    report = run_bench(teacher_bundle, teacher=teacher_run[0], data=teacher_run[1], settings=TINY,
                       work=tmp_path / "work", progress=False, agent=agent)
    assert list(report["variants"]) == ["teacher-torch-fp32", "teacher-onnx-fp32", "teacher-onnx-int8",
                                        "student-onnx-int8"]
    for variant in report["variants"].values():
        assert variant["quality"]["accuracy"] is not None and variant["disk_bytes"] > 0
        assert set(variant["1"]["stage_latency_ms"]) == {"preprocess", "tokenize", "image_encoder",
                                                          "text_encoder", "head"}
    ratios = report["ratios"][0]
    torch_p50 = report["variants"]["teacher-torch-fp32"]["1"]["latency_ms"]["p50"]
    int8_p50 = report["variants"]["student-onnx-int8"]["1"]["latency_ms"]["p50"]
    assert ratios["p50_speedup_vs_teacher_torch_fp32"] == pytest.approx(torch_p50 / int8_p50)

    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["ratios"] == report["ratios"]
    text = paths["markdown"].read_text()
    for name in report["variants"]:
        assert f"| {name} |" in text
    assert "## Throughput" in text and "≥ 10×" in text
    assert paths["plot"].stat().st_size > 5000

    explain = report["agent"]["explain"]
    assert explain["bundle"]["heavy_modules_loaded"] == [] and "torch" in explain["reference"]["heavy_modules_loaded"]
    assert explain["speedup_vs_reference"] == pytest.approx(
        explain["reference_seconds_per_case"] / explain["seconds_per_case"])
    assert all(0 <= v <= 1 for v in explain["top10_overlap"]["top_tokens"])
    assert explain["teacher_bundle"]["heavy_modules_loaded"] == []
    assert len(explain["teacher_bundle_top10_overlap"]["top_patches"]) == 2
    edge = report["agent"]["edge"]
    assert edge["site"].endswith("site-01") and edge["stages"]["embed"]["cases"] > 0
    assert edge["student_to_update_ratio"] > 1
    memory = report["agent"]["memory"]
    assert set(memory["headroom_mb"]) == {"8 GB server", "16 GB server", "--ram-budget"}
    assert memory["headroom_mb"]["8 GB server"] == pytest.approx(8192 - memory["heavy_path_peak_rss_mb"])
    assert "## Explanation cost" in text and "## Edge round" in text and "headroom" in text


def test_top10_overlap_counts_shared_features_per_output():
    ours = [{"top_patches": [[1, 2, 3], [4, 5, 6]], "top_tokens": [[1, 2], [3, 4]]}]
    reference = [{"top_patches": [[3, 2, 9], [7, 8, 9]], "top_tokens": [[2, 1], [3, 9]]}]
    overlap = top10_overlap(ours, reference)
    assert overlap["top_patches"] == pytest.approx([2 / 3, 0.0])
    assert overlap["top_tokens"] == pytest.approx([1.0, 0.5])


def test_markdown_marks_missing_measurements_instead_of_inventing_them():
    report = {"machine": {"cpu": "cpu", "architecture": "x86_64", "logical_cores": 2, "physical_cores": 2,
                          "memory_gb": 8, "int8_instruction_sets": [], "versions": {"onnxruntime": "1", "torch": None}},
              "settings": {"threads": [1], "batches": [1], "runs": 1, "repeats": 1, "warmup": 0, "cases_timed": 1,
                           "timing_data": "d", "session": "s"},
              "variants": {}, "ratios": [{"threads": 1, "p50_speedup_vs_teacher_torch_fp32": None,
                                          "p50_speedup_vs_teacher_onnx_int8": None,
                                          "size_ratio_vs_teacher_checkpoint": None, "student_int8_peak_rss_mb": None}]}
    text = markdown(report)
    assert "| 1 | p50 speedup vs teacher torch fp32 | – | ≥ 10× |" in text
    assert "| 1 | student INT8 peak RSS, single stream | – | ≤ 400 MB |" in text


def test_bench_command_rejects_bad_thread_lists(teacher_bundle):
    result = CliRunner().invoke(main, ["bench", str(teacher_bundle), "--threads", "two"])
    assert result.exit_code == 2 and "--threads" in result.output


def test_a_bundle_is_measured_whatever_its_name_and_the_side_benchmarks_are_subcommands(teacher_bundle, tmp_path,
                                                                                       monkeypatch):
    listing = CliRunner().invoke(main, ["bench", "--help"])
    assert listing.exit_code == 0
    for name in ("measure", "federated", "frozen-rounds", "poisoning", "embedding-parity", "int8-saturation"):
        assert name in listing.output
    side = CliRunner().invoke(main, ["bench", "int8-saturation", "--help"])
    assert side.exit_code == 0 and "--inputs" in side.output
    named = CliRunner().invoke(main, ["bench", "measure", str(teacher_bundle), "--threads", "two"])
    assert named.exit_code == 2 and "--threads" in named.output
    monkeypatch.chdir(tmp_path)  # a bundle directory called like a subcommand is still a bundle
    (tmp_path / "poisoning").symlink_to(teacher_bundle)
    clash = CliRunner().invoke(main, ["bench", "poisoning", "--threads", "two"])
    assert clash.exit_code == 2 and "--threads" in clash.output


def test_other_bundles_are_timed_beside_the_bundle_in_the_same_run(teacher_bundle, teacher_run, tmp_path):
    import shutil

    from fedlite.errors import InputError

    other = tmp_path / "mobile-int8"
    shutil.copytree(teacher_bundle, other)
    report = run_bench(teacher_bundle, data=teacher_run[1], settings=TINY, work=tmp_path / "work", progress=False,
                       agent=None, beside=(other,))
    assert list(report["variants"]) == ["student-onnx-int8", "beside-mobile-int8"]
    beside = report["variants"]["beside-mobile-int8"]
    assert beside["1"]["latency_ms"]["n"] == TINY.runs * TINY.repeats and beside["quality"]["accuracy"] is not None
    assert "| beside-mobile-int8 |" in markdown(report)
    with pytest.raises(InputError, match="both be reported"):
        run_bench(teacher_bundle, data=teacher_run[1], settings=TINY, agent=None, beside=(other, other))
