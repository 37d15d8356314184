"""`fedlite export` end to end on a small trained teacher: the bundle, its hashes, its gate, its runtime."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fedlite.cli import main
from fedlite.data.manifest import read_dataset
from fedlite.errors import InputError
from fedlite.export import pipeline
from fedlite.export.bundle import MANIFEST, verify_bundle
from fedlite.export.distill import DistillConfig
from fedlite.export.parity import NO_GATE, Gate, ParityGateFailed
from fedlite.export.pipeline import ExportOptions, export_bundle
from fedlite.export.prune import PruneConfig
from fedlite.export.quantize import QuantSettings, op_counts
from fedlite.run_record import run_record

LENIENT = NO_GATE  # these tests check other parts of the export; test_export_gate.py checks the gate
QUICK = dict(distill_config=DistillConfig(epochs=1, batch_size=16), batch_size=16, progress=False)


@pytest.fixture(scope="module")
def int8_bundle(teacher_run, tmp_path_factory):
    checkpoint, split = teacher_run
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    options = ExportOptions(int8=True, prune=PruneConfig(fraction=0.5, batches=2), gate=LENIENT,
                            fp32_copy=out.with_name("bundle-fp32"), **QUICK)
    return export_bundle(checkpoint, out, options, data=split)


def test_int8_bundle_is_complete_and_self_describing(int8_bundle, teacher_run):
    meta = int8_bundle.meta
    names = set(meta["files"])
    assert names == {"image_encoder.onnx", "text_encoder.onnx", "head.onnx", "head.safetensors", "tokenizer.json"}
    assert meta["quantization"]["mode"] == "dynamic" and meta["quantization"]["weights"] == "QInt8"
    assert meta["graphs"]["text_encoder"]["inputs"]["input_ids"] == ["batch", "sequence"]
    assert meta["stage_names"] == list(read_dataset(teacher_run[1] / "test").info.stage_names)
    teacher_training = run_record(meta["teacher"]["training"])  # how the teacher was trained, in the run schema
    assert (teacher_training.kind, teacher_training.step) == ("centralized", 3)
    assert meta["export"]["prune"]["parameters_after"] < meta["export"]["prune"]["parameters_before"]
    assert set(meta["parity"]["models"]) == {"teacher", "student", "student-onnx-fp32", "bundle"}
    fp32 = verify_bundle(int8_bundle.bundle.with_name("bundle-fp32"))
    assert fp32["quantization"] is None and fp32["parity"] == meta["parity"]
    student, onnx_fp32 = meta["parity"]["models"]["student"], meta["parity"]["models"]["student-onnx-fp32"]
    assert onnx_fp32["accuracy"] == student["accuracy"] and onnx_fp32["auc"] == pytest.approx(student["auc"], abs=1e-3)
    assert 0 <= meta["parity"]["models"]["bundle"]["case_agreement"] <= 1
    for graph in ("image_encoder.onnx", "text_encoder.onnx"):
        assert op_counts(int8_bundle.bundle / graph).get("MatMulInteger", 0) > 0
    assert "MatMulInteger" not in op_counts(int8_bundle.bundle / "head.onnx")
    assert verify_bundle(int8_bundle.bundle)["content_sha256"] == meta["content_sha256"]


def test_the_bundle_records_where_each_steps_cases_came_from(int8_bundle, teacher_run):
    split = teacher_run[1]
    sources = int8_bundle.meta["data_sources"]
    assert sources["distill"] == {"kind": "pooled", "option": "--data", "path": str(split / "train"),
                                  "cases": len(read_dataset(split / "train"))}
    assert sources["verification"]["path"] == str(split / "test")
    assert sources["verification"]["cases"] == int8_bundle.parity["models"]["bundle"]["cases"]
    assert sources["calibration"]["kind"] == "pooled" and 0 < sources["calibration"]["cases"] <= 64
    assert int8_bundle.parity["gate"] == LENIENT.to_dict()


def test_proxy_data_distills_at_the_coordinator_and_held_out_cases_verify(teacher_run, synth_data, tmp_path):
    checkpoint, split = teacher_run
    options = ExportOptions(prune=PruneConfig(fraction=0.0), gate=LENIENT, **QUICK)
    result = export_bundle(checkpoint, tmp_path / "b", options, proxy_data=synth_data.root, eval_data=split / "test")
    sources = result.meta["data_sources"]
    assert sources["distill"] == {"kind": "proxy", "option": "--proxy-data", "path": str(synth_data.root),
                                  "cases": len(synth_data)}
    assert sources["calibration"]["kind"] == "proxy" and sources["calibration"]["path"] == str(synth_data.root)
    assert sources["verification"] == {"kind": "pooled", "option": "--eval-data", "path": str(split / "test"),
                                       "cases": len(read_dataset(split / "test"))}
    assert result.meta["export"]["distill"]["steps"] > 0


@pytest.mark.parametrize("args, needs", [
    ([], "--proxy-data"),
    (["--proxy-data", "{split}/train"], "--eval-data"),
    (["--data", "{split}", "--proxy-data", "{split}/train"], "one source"),
])
def test_export_never_picks_its_data_itself(teacher_run, tmp_path, args, needs):
    checkpoint, split = teacher_run
    out = tmp_path / "b"
    args = [a.format(split=split) for a in args]
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert needs in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_bundle_predicts_in_a_process_that_never_imports_torch(int8_bundle, teacher_run):
    script = (
        "import json, sys\n"
        "from fedlite.agents.runtime import BundleRuntime\n"
        "from fedlite.data.manifest import read_dataset\n"
        "from fedlite.metrics import evaluate_predictions\n"
        f"rt = BundleRuntime({str(int8_bundle.bundle)!r})\n"
        f"data = read_dataset({str(teacher_run[1] / 'test')!r})\n"
        "p = rt.predict_dataset(data, batch_size=5)\n"
        "m = evaluate_predictions([c.leukemia for c in data.cases], [-1 if c.stage is None else c.stage "
        "for c in data.cases], p.leukemia_prob, p.stage_prob)\n"
        "print(json.dumps({'heavy': [n for n in ('torch', 'timm', 'transformers') if n in sys.modules],"
        " 'accuracy': m['accuracy'], 'auc': m['auc']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    bundle = int8_bundle.parity["models"]["bundle"]
    assert result["accuracy"] == pytest.approx(bundle["accuracy"], abs=0.03)  # batch size shifts dynamic INT8 slightly
    assert result["auc"] == pytest.approx(bundle["auc"], abs=0.03)


@pytest.mark.parametrize("name", ["image_encoder.onnx", "text_encoder.onnx", "head.onnx", "head.safetensors",
                                  "tokenizer.json", MANIFEST])
def test_a_flipped_byte_in_any_file_is_refused(int8_bundle, tmp_path, name):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(int8_bundle.bundle, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        verify_bundle(copy)
    assert name in str(err.value)
    result = CliRunner().invoke(main, ["export", "verify", str(copy)])
    assert result.exit_code == 2 and name in result.output


def test_verify_command_accepts_an_intact_bundle(int8_bundle):
    result = CliRunner().invoke(main, ["export", "verify", str(int8_bundle.bundle)])
    assert result.exit_code == 0, result.output
    assert "6 files" not in result.output and "5 files match" in result.output


def test_fp32_teacher_export_reproduces_the_teacher(teacher_run, tmp_path):
    checkpoint, split = teacher_run
    options = ExportOptions(distill=False, prune=PruneConfig(fraction=0.0), int8=False, fuse=False,
                            gate=Gate(max_accuracy_drop=0.0, max_auc_drop=0.0), batch_size=16, progress=False)
    result = export_bundle(checkpoint, tmp_path / "fp32", options, data=split)
    bundle = result.parity["models"]["bundle"]
    assert bundle["case_agreement"] == 1.0
    assert bundle["max_leukemia_prob_difference"] < 1e-4 and bundle["max_stage_prob_difference"] < 1e-4
    assert result.meta["quantization"] is None


def test_static_qdq_quantization_with_calibration_stays_close(teacher_run, tmp_path):
    checkpoint, split = teacher_run
    options = ExportOptions(distill=False, prune=PruneConfig(fraction=0.0), int8=True,
                            quant=QuantSettings(mode="static", isa="avx2"), calibration_cases=16,
                            gate=LENIENT, batch_size=16, progress=False)
    result = export_bundle(checkpoint, tmp_path / "static", options, data=split, calibration=split / "train")
    assert op_counts(result.bundle / "image_encoder.onnx").get("QuantizeLinear", 0) > 0
    bundle = result.parity["models"]["bundle"]
    assert bundle["leukemia_agreement"] >= 0.85
    assert result.meta["quantization"]["weights"] == "QUInt8"


def test_quantized_embeddings_stay_close(teacher_run, tmp_path):
    checkpoint, split = teacher_run
    options = ExportOptions(distill=False, prune=PruneConfig(fraction=0.0), int8=True, fuse=False,
                            quant=QuantSettings(embeddings=True), gate=LENIENT, batch_size=16, progress=False)
    result = export_bundle(checkpoint, tmp_path / "emb", options, data=split)
    assert "Gather" in result.meta["quantization"]["operators"]
    assert op_counts(result.bundle / "text_encoder.onnx").get("DequantizeLinear", 0) > 0
    assert result.parity["models"]["bundle"]["leukemia_agreement"] >= 0.9


def test_the_gate_refuses_a_broken_export_and_keeps_the_old_bundle(teacher_run, tmp_path, monkeypatch):
    checkpoint, split = teacher_run
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("previous bundle")
    real_export = pipeline.export_graphs

    def flip_leukemia_head(model, directory):  # an export step that breaks the model
        import torch

        with torch.no_grad():
            model.leukemia_head.weight.mul_(-1)
            model.leukemia_head.bias.mul_(-1)
        return real_export(model, directory)

    monkeypatch.setattr(pipeline, "export_graphs", flip_leukemia_head)
    options = ExportOptions(distill=False, prune=PruneConfig(fraction=0.0), int8=False, batch_size=16, progress=False)
    with pytest.raises(ParityGateFailed, match="points below the teacher"):
        export_bundle(checkpoint, out, options, data=split, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_an_existing_bundle_is_not_replaced_without_force(teacher_run, int8_bundle):
    with pytest.raises(InputError, match="already exists"):
        export_bundle(teacher_run[0], int8_bundle.bundle, ExportOptions(progress=False), data=teacher_run[1])


def test_corrupt_or_incompatible_checkpoints_are_named(teacher_run, tmp_path):
    import shutil

    checkpoint, split = teacher_run
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt weights") as err:
        export_bundle(broken, tmp_path / "b1", ExportOptions(progress=False), data=split)
    assert "model.safetensors" in str(err.value)

    shutil.copyfile(checkpoint / "model.safetensors", weights)
    config = json.loads((broken / "config.json").read_text())
    config["model"]["modality"] = "image"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="weights do not match the config"):
        export_bundle(broken, tmp_path / "b2", ExportOptions(progress=False), data=split)

    (broken / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt checkpoint config"):
        export_bundle(broken, tmp_path / "b3", ExportOptions(progress=False), data=split)
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b3").exists()


def test_export_command_writes_a_bundle(teacher_run, tmp_path):
    checkpoint, split = teacher_run
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--int8", "--data", str(split), "--out",
                                       str(tmp_path / "b"), "--distill-epochs", "1", "--prune", "0.3",
                                       "--batch-size", "16", "--max-accuracy-drop", "100", "--max-auc-drop", "1",
                                       "--max-stage-f1-drop", "1", "--min-agreement", "0",
                                       "--min-leukemia-agreement", "0", "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.output[result.output.index("{"):])
    assert meta["quantization"]["isa"] == "avx512_vnni"
    assert np.isclose(meta["export"]["prune"]["fraction"], 0.3)
    assert meta["parity"]["gate"]["min_case_agreement"] == 0 and meta["data_sources"]["distill"]["kind"] == "pooled"
    verify_bundle(tmp_path / "b")
