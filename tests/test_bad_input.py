"""Every kind of bad input gets a clear error naming file, line and field; lossless fixes are applied."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fedlite.cli import main
from fedlite.data.check import check_dataset
from fedlite.data.images import load_image, preprocess_image
from fedlite.data.manifest import MAX_NOTE_CHARS, read_dataset
from fedlite.errors import InputError
from fedlite.text import builtin_tokenizer, encode_notes

GOOD = {"id": "a", "image": "a.png", "text": "WBC 40, blasts 60%.", "leukemia": 1, "stage": 2}


def _write_image(path, mode="RGB", size=(32, 32)):
    if mode == "I;16":
        Image.fromarray(np.full(size, 40000, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, color=(200, 100, 150, 255)[: len(mode)] if mode != "L" else 128).save(path)


def _dataset(tmp_path, records, raw_lines=None):
    root = tmp_path / "ds"
    root.mkdir()
    for r in records:
        if isinstance(r, dict) and isinstance(r.get("image"), str) and not (root / r["image"]).exists():
            _write_image(root / r["image"])
    lines = [json.dumps(r) for r in records] if raw_lines is None else raw_lines
    (root / "manifest.jsonl").write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return root


def _problems(root):
    with pytest.raises(InputError) as info:
        read_dataset(root)
    return [str(p) for p in info.value.problems]


def test_a_good_dataset_reads(tmp_path):
    root = _dataset(tmp_path, [GOOD, {**GOOD, "id": "b", "leukemia": 0, "stage": None}])
    ds = read_dataset(root)
    assert [c.id for c in ds.cases] == ["a", "b"]
    assert check_dataset(root).ok


@pytest.mark.parametrize("change, field, message", [
    ({"leukemia": 2}, "leukemia", "must be 0 or 1"),
    ({"leukemia": True}, "leukemia", "must be 0 or 1"),
    ({"stage": 7}, "stage", "must be an integer 0..3"),
    ({"stage": None}, "stage", "positive cases need a stage"),
    ({"leukemia": 0, "stage": 1}, "stage", "negative cases carry no stage"),
    ({"text": ""}, "text", "the clinical note is empty"),
    ({"text": "   \n"}, "text", "the clinical note is empty"),
    ({"text": "x" * (MAX_NOTE_CHARS + 1)}, "text", "far past"),
    ({"text": 5}, "text", "must be a string"),
    ({"id": ""}, "id", "must be a non-empty string"),
])
def test_bad_fields_name_file_line_and_field(tmp_path, change, field, message):
    root = _dataset(tmp_path, [GOOD, {**GOOD, "id": "b", **change}])
    problems = _problems(root)
    assert len(problems) == 1
    assert f"manifest.jsonl:2: field '{field}'" in problems[0]
    assert message in problems[0]


def test_missing_fields_and_json_errors_and_duplicates_are_all_reported_at_once(tmp_path):
    root = _dataset(tmp_path, [], raw_lines=[
        json.dumps(GOOD),
        json.dumps({k: v for k, v in GOOD.items() if k != "stage"} | {"id": "b"}),
        '{"id": "c", "image": ',
        json.dumps(GOOD),
        "[1, 2]",
    ])
    _write_image(root / "a.png")
    problems = _problems(root)
    assert any(":2: field 'stage': missing" in p for p in problems)
    assert any(":3: not valid JSON" in p for p in problems)
    assert any(":4: field 'id': duplicate id 'a', first seen on line 1" in p for p in problems)
    assert any(":5: each line must be a JSON object" in p for p in problems)
    assert len(problems) == 4


def test_non_utf8_note_is_reported_with_its_line(tmp_path):
    bad = json.dumps({**GOOD, "id": "b", "text": "caf\u00e9"}).encode().replace("\\u00e9".encode(), b"\xe9")
    root = _dataset(tmp_path, [], raw_lines=[json.dumps(GOOD), bad])
    _write_image(root / "a.png")
    problems = _problems(root)
    assert len(problems) == 1 and ":2: not valid UTF-8" in problems[0]


def test_stage_range_follows_dataset_json(tmp_path):
    root = _dataset(tmp_path, [{**GOOD, "stage": 2}])
    (root / "dataset.json").write_text(json.dumps({"stage_names": ["early", "late"]}))
    assert "must be an integer 0..1" in _problems(root)[0]


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(InputError, match="dataset directory not found"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no manifest.jsonl"):
        read_dataset(tmp_path / "empty")


def test_grayscale_and_palette_and_opaque_rgba_are_converted_losslessly(tmp_path):
    for mode in ("L", "P", "RGBA"):
        path = tmp_path / f"{mode}.png"
        _write_image(path, mode)
        array = load_image(path)
        assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    gray = load_image(tmp_path / "L.png")
    assert (gray[..., 0] == gray[..., 1]).all() and gray[0, 0, 0] == 128
    assert preprocess_image(tmp_path / "L.png").shape == (3, 224, 224)


def test_transparent_16bit_corrupt_missing_and_tiny_images_are_refused(tmp_path):
    transparent = tmp_path / "t.png"
    Image.new("RGBA", (32, 32), (10, 10, 10, 0)).save(transparent)
    with pytest.raises(InputError, match="transparent pixels"):
        load_image(transparent)
    deep = tmp_path / "deep.png"
    _write_image(deep, "I;16")
    with pytest.raises(InputError, match="16-bit"):
        load_image(deep)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(InputError, match="cannot decode image"):
        load_image(corrupt)
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    tiny = tmp_path / "tiny.png"
    _write_image(tiny, size=(4, 4))
    with pytest.raises(InputError, match="only 4x4 pixels"):
        load_image(tiny)


def test_data_check_reports_every_image_problem_with_manifest_line(tmp_path):
    root = _dataset(tmp_path, [GOOD, {**GOOD, "id": "b", "image": "b.png"}, {**GOOD, "id": "c", "image": "c.jpg"}])
    (root / "b.png").unlink()
    (root / "c.jpg").write_bytes(b"garbage")
    report = check_dataset(root)
    messages = [str(p) for p in report.problems]
    assert any("manifest.jsonl:2: field 'image': image file not found" in m for m in messages)
    assert any("manifest.jsonl:3: field 'image': cannot decode image" in m for m in messages)
    result = CliRunner().invoke(main, ["data", "check", str(root)])
    assert result.exit_code == 1
    assert "2 problem(s)" in result.output


def test_long_notes_are_truncated_and_counted_not_silently(tmp_path):
    tok = builtin_tokenizer()
    encoded = encode_notes(tok, ["short note", "blasts " * 400], max_length=64)
    assert encoded.truncated == 1
    assert len(encoded.ids[1]) == 64
    assert encoded.ids[1][-1] == tok.token_to_id("[SEP]")


def test_cli_shows_input_errors_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope"), "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "checkpoint directory not found" in result.output
    assert "Traceback" not in result.output


def _png_claiming(path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height``: what a decompression bomb looks like
    before anything is decoded."""
    import struct
    import zlib

    Image.new("RGB", (32, 32)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    path.write_bytes(bytes(data))


def test_an_image_too_large_to_decode_is_refused_from_its_header(tmp_path):
    _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(InputError, match="20000x20000 pixels .400 MP., over the 67 MP"):
        load_image(tmp_path / "bomb.png")
    _png_claiming(tmp_path / "large.png", 11000, 11000)  # under PIL's own limit, still over ours
    with pytest.raises(InputError, match="over the 67 MP"):
        load_image(tmp_path / "large.png")


def test_an_image_path_leaving_the_dataset_is_refused_unless_dataset_json_declares_its_directory(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (64, 64)).save(outside / "smear.png")
    data = tmp_path / "data"
    data.mkdir()
    record = {"id": "c1", "image": "../elsewhere/smear.png", "text": "a note", "leukemia": 0, "stage": None}
    (data / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(InputError, match="leaves the dataset directory"):
        read_dataset(data)
    for image in ("../../../../etc/passwd", "/etc/passwd"):
        (data / "manifest.jsonl").write_text(json.dumps({**record, "image": image}) + "\n")
        with pytest.raises(InputError, match="leaves the dataset directory"):
            read_dataset(data)
    (data / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    (data / "dataset.json").write_text(json.dumps({"image_dirs": ["../elsewhere"]}))
    assert read_dataset(data).image_path(read_dataset(data).cases[0]) == (outside / "smear.png").resolve()
