"""caption_images.py end to end on a tiny BLIP: every input kind, odd and bad images, resume after SIGKILL, two
torchrun processes, parquet output, re-ranking and the one-line user errors."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import caption_images
import utils
from captioning import job
from models import BlipCaptioner, Captioner
from models.checkpoint import save_transformers_directory
from tests.conftest import FIXTURES
from tests.data.test_image_inputs import _picture, make_folder, make_parquet, make_shards

REPO = Path(__file__).resolve().parents[1]
GENERATION = ["--num-beams", "2", "--max-length", "10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BLIP saved as a transformers folder, and the inputs: a folder with odd and bad images, two shards,
    a parquet file."""
    root = tmp_path_factory.mktemp("caption_images")
    torch.manual_seed(0)
    model = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt").eval()
    save_transformers_directory(model, root / "ckpt")
    folder = make_folder(root / "photos")
    shards = make_shards(root / "shards")
    parquet = make_parquet(root / "table.parquet")
    captioner = Captioner.from_pretrained(root / "ckpt", device="cpu")
    return root, folder, shards, parquet, captioner


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _identity(line: dict) -> tuple:
    return line.get("path") or line.get("shard"), line.get("row"), line["key"]


def _run(*argv) -> dict:
    return caption_images.main([*map(str, argv), "--no-progress"])


def test_every_input_kind_captioned_once_equal_to_captioner(world):
    root, folder, shards, parquet, captioner = world
    out = root / "all" / "captions.jsonl"
    inputs = [root / "photos", shards["pattern"], parquet["path"]]
    summary = _run("--checkpoint", root / "ckpt", "--input", *inputs, "--key-column", "id", "--out", out,
                   "--batch-size", 4, "--num-workers", 2, "--write-sidecar", *GENERATION)
    lines = _lines(out)
    identities = [_identity(line) for line in lines]
    assert len(identities) == len(set(identities)) == 6 + 6 + 4  # every good image, each once
    by_place = {(line.get("path") or line.get("shard"), line["key"]): line["caption"] for line in lines}

    options = dict(num_beams=2, max_length=10)
    paths = [str(root / "photos" / relative) for relative in folder["good"]]
    expected = captioner.caption(paths, **options)
    for path, caption, relative in zip(paths, expected, folder["good"]):
        assert by_place[(path, Path(relative).with_suffix("").as_posix())] == caption, relative
        assert Path(path).with_suffix(".txt").read_text() == caption + "\n"  # the sidecar
    shard_items = sorted(shards["images"].items())
    expected = captioner.caption([Image.open(io.BytesIO(payload)) for _, payload in shard_items], **options)
    assert [by_place[identity] for identity, _ in shard_items] == expected
    parquet_items = sorted(parquet["images"].items())
    expected = captioner.caption([Image.open(io.BytesIO(payload)) for _, payload in parquet_items], **options)
    assert [by_place[(parquet["path"], key)] for key, _ in parquet_items] == expected

    failed = {line["key"]: line for line in _lines(root / "all" / "captions.failed.jsonl")}
    for relative, reason in folder["bad"].items():
        line = failed[Path(relative).with_suffix("").as_posix()]
        assert line["path"] == str(root / "photos" / relative) and reason.lower() in line["reason"].lower()
    assert "no image member" in failed[shards["no_image"][1]]["reason"]
    assert failed[parquet["null_key"]]["row"] == 4 and failed[parquet["null_key"]]["shard"] == parquet["path"]
    assert len(failed) == 4 + 1 + 1

    on_disk = json.loads((root / "all" / "captions.summary.json").read_text())
    assert on_disk == summary
    assert (summary["captioned"], summary["failed"], summary["skipped"]) == (16, 6, 0)
    assert summary["generation"]["num_beams"] == 2 and summary["images_per_second"] > 0

    # The same command again: nothing to do, the output unchanged.
    again = _run("--checkpoint", root / "ckpt", "--input", *inputs, "--key-column", "id", "--out", out,
                 "--batch-size", 4, "--num-workers", 0, *GENERATION)
    assert (again["captioned"], again["failed"], again["skipped"]) == (0, 0, 22)
    assert _lines(out) == lines

    # Parquet output: the same captions.
    import pyarrow.parquet as pq

    table = pq.read_table(_run("--checkpoint", root / "ckpt", "--input", *inputs, "--key-column", "id",
                               "--out", root / "all" / "captions.parquet", "--num-workers", 0, *GENERATION)["out"])
    rows = table.to_pylist()
    assert sorted((_identity(row), row["caption"]) for row in rows) == sorted(
        (_identity(line), line["caption"]) for line in lines)


@pytest.mark.slow
def test_sigkill_then_resume_captions_every_image_once(world, tmp_path):
    root = world[0]
    many = tmp_path / "many"
    many.mkdir()
    for index in range(40):
        _picture(index).resize((24, 24)).save(many / f"{index:03d}.png")
    out = tmp_path / "out.jsonl"
    command = [sys.executable, str(REPO / "caption_images.py"), "--checkpoint", str(root / "ckpt"), "--input",
               str(many), str(root / "photos"), "--out", str(out), "--batch-size", "1", "--num-workers", "0",
               "--no-progress", "--num-beams", "3", "--max-length", "20"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "out.jsonl.parts" / "part-00000.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if part.exists() and part.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not out.exists() and not (tmp_path / "out.summary.json").exists()  # killed mid-way
    written = part.read_bytes()
    assert 3 <= written.count(b"\n") < 46
    with part.open("ab") as handle:  # as if killed in the middle of a write
        handle.write(b'{"key": "torn", "path": "x", "capt')

    summary = _run("--checkpoint", root / "ckpt", "--input", many, root / "photos", "--out", out, "--batch-size",
                   4, "--num-workers", 0, "--num-beams", 3, "--max-length", 20)
    lines = _lines(out)
    identities = [_identity(line) for line in lines]
    assert len(identities) == len(set(identities)) == 40 + 6
    assert summary["skipped"] == written.count(b"\n") and summary["captioned"] + summary["failed"] + \
        summary["skipped"] == 40 + 10
    assert part.read_bytes().count(b"\n") == sum(1 for _ in part.open("rb"))  # the torn tail was cut off


@pytest.mark.slow
def test_two_torchrun_processes_equal_one_process(world, tmp_path):
    root, _, shards, _, _ = world
    common = ["--checkpoint", str(root / "ckpt"), "--input", shards["pattern"], "--batch-size", "2",
              "--num-workers", "0", "--no-progress", *GENERATION]
    env = {**ENV, "NPROC": "2"}
    completed = subprocess.run(["bash", str(REPO / "scripts" / "caption.sh"), *common, "--out",
                                str(tmp_path / "two.jsonl")], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    one = _run(*common[:-len(GENERATION) - 1], *GENERATION, "--out", tmp_path / "one.jsonl")
    two_lines, one_lines = _lines(tmp_path / "two.jsonl"), _lines(tmp_path / "one.jsonl")
    assert len(two_lines) == len({_identity(line) for line in two_lines}) == 6
    assert sorted(map(json.dumps, two_lines)) == sorted(map(json.dumps, one_lines))
    summary = json.loads((tmp_path / "two.summary.json").read_text())
    assert summary["world_size"] == 2 and summary["captioned"] == one["captioned"] == 6 and summary["failed"] == 1
    parts = sorted((tmp_path / "two.jsonl.parts").glob("part-*.jsonl"))
    shard_of_part = [{line["shard"] for line in _lines(part)} for part in parts]
    assert len(parts) == 2 and all(len(shard_set) == 1 for shard_set in shard_of_part)  # whole shards per rank


def test_rerank_by_clip_keeps_a_candidate_and_its_score(world, tmp_path, tiny_clip_dir):
    root, folder, _, _, captioner = world
    summary = _run("--checkpoint", root / "ckpt", "--input", root / "photos" / "sub" / "*.png", "--out",
                   tmp_path / "r.jsonl", "--num-workers", 0, "--candidates", 3, "--rerank", "clip", "--clip-model",
                   tiny_clip_dir, *GENERATION)
    assert summary["captioned"] == 2
    for line in _lines(tmp_path / "r.jsonl"):
        candidates = captioner.caption_candidates([line["path"]], 3, num_beams=2, max_length=10)[0]
        assert line["caption"] in candidates and 0.0 <= line["clip_score"] <= 2.5


def test_user_errors_are_one_line_with_status_2(world, tmp_path, capsys):
    root = world[0]
    (tmp_path / "empty").mkdir()
    cases = [
        (["--checkpoint", root / "ckpt", "--input", tmp_path / "missing", "--out", tmp_path / "o.jsonl"],
         "no such file or folder"),
        (["--checkpoint", root / "ckpt", "--input", tmp_path / "empty", "--out", tmp_path / "o.jsonl"],
         "no image files"),
        (["--checkpoint", tmp_path / "nowhere.pth", "--input", root / "photos", "--out", tmp_path / "o.jsonl"],
         "nowhere.pth: no such file or directory"),
        (["--checkpoint", root / "ckpt", "--input", root / "photos", "--out", tmp_path / "o.jsonl", "--max-length",
          "500"], "max_length 500 exceeds"),
        (["--checkpoint", root / "ckpt", "--input", root / "photos", "--out", tmp_path / "o.jsonl",
          "--out-format", "parquet"], "should end with .parquet"),
    ]
    for argv, message in cases:
        status = utils.run_cli(caption_images.main, job.user_errors(), [*map(str, argv), "--no-progress"],
                               prog="caption_images.py")
        stderr = capsys.readouterr().err
        error = [line for line in stderr.splitlines() if line.startswith("caption_images.py: error:")]
        assert status == 2 and len(error) == 1 and message in error[0], (argv, stderr)
        assert "Traceback" not in stderr
    # A resume with other decoding settings would mix two decodings in one file.
    out = tmp_path / "glob.jsonl"
    common = ["--checkpoint", root / "ckpt", "--input", root / "photos" / "a.jpg", "--out", out, "--num-workers", 0]
    _run(*common, *GENERATION)
    status = utils.run_cli(caption_images.main, job.user_errors(), [*map(str, common), "--num-beams", "1"],
                           prog="caption_images.py")
    assert status == 2 and "started with other settings (generation" in capsys.readouterr().err


def test_device_decode_on_cpu_covers_the_same_images(world, tmp_path, monkeypatch):
    """--device-decode on (the nvJPEG path, here run by torchvision on the CPU): the same images captioned, the same
    failures; plain JPEGs took the device path (pixels within a level of PIL's, tests/data/test_image_inputs.py)."""
    root, folder, shards, _, _ = world
    inputs = [root / "photos", shards["pattern"]]
    decoded = []
    original = job.decode_device_jpegs
    monkeypatch.setattr(job, "decode_device_jpegs", lambda jpegs, *rest: decoded.extend(jpegs) or original(jpegs, *rest))
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.jsonl"
        _run("--checkpoint", root / "ckpt", "--input", *inputs, "--out", out, "--num-workers", 0, "--batch-size",
             4, "--device-decode", mode, *GENERATION)
        runs[mode] = (sorted(map(_identity, _lines(out))), sorted(map(_identity, _lines(tmp_path / f"{mode}.failed.jsonl"))))
    assert runs["on"] == runs["off"] and len(runs["on"][0]) == 12 and len(runs["on"][1]) == 5
    assert len(decoded) == 1 + len(shards["images"])  # a.jpg and the shards' JPEGs; not CMYK c.jpg, rotated e.jpg
