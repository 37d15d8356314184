from click.testing import CliRunner

from fedlite.cli import main


def test_quickstart_runs_end_to_end_and_says_where_results_are(tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--cases", "60", "--rounds", "2", "--local-epochs", "1",
            "--export-epochs", "2", "--report-only-gate"]  # 8 validation cases: the gate's rates mean little
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ("data/manifest.jsonl", "data/split/split.json", "federated/best/model.safetensors",
                 "federated/rounds.jsonl", "centralized/best/model.safetensors", "centralized/curves.png",
                 "bundle/bundle.json", "bundle/image_encoder.onnx"):
        assert (out / name).is_file(), name
    assert "stage macro-F1" in result.output and str(out / "federated") in result.output
    table = result.output.split("stage F1")[1]
    assert "federated" in table and "centralized" in table
    export = result.output.split("6/8 exporting")[1]
    assert "bundle" in export and str(out / "bundle") in result.output
    assert "verification sites" in export and "site-04" in export  # verified at the sites, on their cases
    assert (out / "predictions.jsonl").is_file() and str(out / "predictions.jsonl") in result.output
    html = next((out / "reports").glob("*/explanation.html"))
    assert (html.parent / "explanation.png").is_file() and str(html) in result.output


def test_help_lists_only_working_commands():
    result = CliRunner().invoke(main, ["--help"])
    commands = result.output.split("Commands:")[1].split()
    listed = {w for w in commands if w in {"data", "train", "evaluate", "quickstart", "export", "predict",
                                           "explain", "agent", "bench", "report"}}
    assert listed == {"data", "train", "evaluate", "quickstart", "export", "bench", "predict", "explain", "agent",
                      "report"}
