from click.testing import CliRunner

from fedlite.cli import main


def test_quickstart_runs_end_to_end_and_says_where_results_are(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(main, ["quickstart", "--out", str(out), "--cases", "60", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    for name in ("data/manifest.jsonl", "data/split/split.json", "run/best/model.safetensors",
                 "run/curves.png", "run/history.jsonl"):
        assert (out / name).is_file(), name
    assert "stage macro-F1" in result.output and str(out / "run" / "best") in result.output
    # a second run replaces the first instead of failing on existing outputs
    assert CliRunner().invoke(main, ["quickstart", "--out", str(out), "--cases", "60", "--epochs", "1"]).exit_code == 0


def test_help_lists_only_working_commands():
    result = CliRunner().invoke(main, ["--help"])
    commands = result.output.split("Commands:")[1].split()
    listed = {w for w in commands if w in {"data", "train", "evaluate", "quickstart", "export", "predict",
                                           "explain", "agent", "bench"}}
    assert listed == {"data", "train", "evaluate", "quickstart"}
