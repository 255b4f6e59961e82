"""data/image_inputs.py: every input kind, odd and bad images, and the split between ranks and workers."""
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data.image_inputs as image_inputs
from data.image_inputs import ImageRecords, InputError, collate_records, record_id, resolve_inputs
from imaging import eval_transform, open_rgb, to_rgb

SIZE = 32


def _picture(index: int, size=(48, 40)) -> Image.Image:
    """A small RGB image that differs per index (a gradient and a block)."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate([x + 0 * y, y + 0 * x, np.full((height, width, 1), 37.0 * index % 256)], axis=2)
    pixels[5:15, 5 + index % 20:20 + index % 20] = (255 - 20 * index) % 256
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png() -> bytes:
    """A PNG header claiming 30000 x 30000 pixels (over twice PIL's MAX_IMAGE_PIXELS): refused at open, no pixels."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def make_folder(root: Path) -> dict:
    """A folder with nested subfolders, odd images and bad files. Returns {"good": [relative paths], "bad":
    {relative path: reason fragment}}."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "bad").mkdir()
    (root / ".hidden").mkdir()
    _picture(0).save(root / "a.jpg", quality=90)
    rgba = _picture(1).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(root / "sub" / "b.png")
    _picture(2).convert("CMYK").save(root / "sub" / "deeper" / "c.jpg", quality=90)
    sixteen = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
    Image.fromarray(sixteen, "I;16").save(root / "sub" / "d.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to be upright
    _picture(3, size=(56, 32)).save(root / "e.jpg", quality=90, exif=exif)
    _picture(4).save(root / "sub" / "f.webp")
    truncated = _jpeg_bytes(_picture(5))
    (root / "bad" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "text.jpg").write_text("this is not a picture\n")
    (root / "bad" / "bomb.png").write_bytes(bomb_png())
    (root / "notes.txt").write_text("not an image extension: ignored\n")
    _picture(6).save(root / ".hidden" / "x.jpg")
    good = ["a.jpg", "e.jpg", "sub/b.png", "sub/d.png", "sub/deeper/c.jpg", "sub/f.webp"]
    bad = {"bad/bomb.png": "decompression bomb", "bad/empty.jpg": "UnidentifiedImageError",
           "bad/text.jpg": "UnidentifiedImageError", "bad/truncated.jpg": "truncated"}
    return {"good": good, "bad": bad}


def make_shards(root: Path, count: int = 2, per_shard: int = 3) -> dict:
    """``count`` webdataset shards of ``per_shard`` samples (jpg + txt + json), the last shard with one more sample
    that has no image. Returns {"pattern", "images": {(shard, key): bytes}, "no_image": (shard, key)}."""
    root.mkdir(parents=True, exist_ok=True)
    images, no_image = {}, None
    for shard_index in range(count):
        shard = root / f"{shard_index:05d}.tar"
        with tarfile.open(shard, "w") as archive:
            samples = [(f"{shard_index:05d}{i:03d}", True) for i in range(per_shard)]
            if shard_index == count - 1:
                samples.append((f"{shard_index:05d}999", False))
            for key, has_image in samples:
                members = {"txt": b"a caption", "json": b"{}"}
                if has_image:
                    members["jpg"] = _jpeg_bytes(_picture(10 + len(images)))
                    images[(str(shard), key)] = members["jpg"]
                else:
                    no_image = (str(shard), key)
                for extension, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return {"pattern": str(root / f"{{00000..{count - 1:05d}}}.tar"), "images": images, "no_image": no_image}


def make_parquet(path: Path, rows: int = 5) -> dict:
    """A parquet file (row groups of 2) with image bytes in ``image`` and string keys in ``id``; the last row's
    image is null. Returns {"path", "images": {key: bytes}, "null_key"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    payloads = [_jpeg_bytes(_picture(30 + row)) for row in range(rows - 1)] + [None]
    keys = [f"img-{row}" for row in range(rows)]
    pq.write_table(pa.table({"id": keys, "image": pa.array(payloads, pa.binary())}), path, row_group_size=2)
    return {"path": str(path), "images": dict(zip(keys[:-1], payloads[:-1])), "null_key": keys[-1]}


def expected_pixels(source) -> torch.Tensor:
    """Captioner.preprocess's pixels for a path or the file's bytes."""
    image = open_rgb(source, exif_transpose=True) if isinstance(source, (str, Path)) else \
        Image.open(io.BytesIO(source))
    return eval_transform(SIZE)(to_rgb(image, exif_transpose=True))


def _records(dataset, monkeypatch=None, worker=None):
    if worker is not None:
        monkeypatch.setattr(image_inputs, "get_worker_info", lambda: SimpleNamespace(id=worker[0],
                                                                                    num_workers=worker[1]))
    return list(iter(dataset))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_inputs")
    folder = make_folder(root / "photos")
    shards = make_shards(root / "shards")
    parquet = make_parquet(root / "table.parquet")
    return SimpleNamespace(root=root, folder=folder, shards=shards, parquet=parquet)


def test_kinds_are_detected_and_checked(inputs, tmp_path):
    root = inputs.root
    (tmp_path / "list.txt").write_text(f"# a comment\n{root / 'photos' / 'a.jpg'}\n\nphotos/sub/b.png\n")
    (root / "list.txt").write_text("photos/a.jpg\n")
    kinds = [source.kind for source in resolve_inputs(
        [str(root / "photos"), str(root / "photos" / "sub" / "*.png"), str(root / "list.txt"),
         inputs.shards["pattern"], inputs.parquet["path"], str(root / "shards" / "*.tar"),
         str(root / "photos" / "a.jpg")], image_column="image", key_column="id")]
    assert kinds == ["folder", "glob", "list", "shards", "parquet", "shards", "glob"]
    (tmp_path / "table.bin").write_bytes(Path(inputs.parquet["path"]).read_bytes())
    with pytest.raises(InputError, match="read as a list of image paths, but it is not a text file"):
        resolve_inputs([str(tmp_path / "table.bin")])  # a list, by its name
    assert resolve_inputs([str(tmp_path / "table.bin")], input_format="parquet")[0].kind == "parquet"  # overridden
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    cases = {
        str(tmp_path / "missing"): "no such file or folder",
        str(tmp_path / "empty"): "no image files",
        str(tmp_path / "only_text"): "no image files",
        str(tmp_path / "blank.txt"): "names no image",
        str(tmp_path / "*.png"): "matches no file",
        str(root / "shards" / "{00000..00004}.tar"): "3 of 5 shards file",
        str(tmp_path / "nothing.parquet"): "1 of 1 parquet file",
    }
    for spec, message in cases.items():
        with pytest.raises(InputError, match=message.replace("shards file", "shards file\\(s\\)")):
            resolve_inputs([spec])
    with pytest.raises(InputError, match="no column 'jpg' \\(--image-column\\); its columns: id, image"):
        resolve_inputs([inputs.parquet["path"]], image_column="jpg")
    with pytest.raises(InputError, match="not a readable parquet"):
        resolve_inputs([str(root / "photos" / "a.jpg")], input_format="parquet")


def test_folder_records_keys_pixels_and_failures(inputs):
    dataset = ImageRecords(resolve_inputs([str(inputs.root / "photos")]), eval_transform(SIZE))
    records = _records(dataset)
    keys = [record.key for record in records]
    # Depth first, each directory in name order; hidden folders and non-image extensions are skipped.
    assert keys == ["a", "bad/bomb", "bad/empty", "bad/text", "bad/truncated", "e", "sub/b", "sub/d",
                    "sub/deeper/c", "sub/f"]
    by_key = {record.key: record for record in records}
    for relative in inputs.folder["good"]:
        record = by_key[Path(relative).with_suffix("").as_posix()]
        assert record.kind == "image" and record.location == {"path": str(inputs.root / "photos" / relative)}
        assert torch.equal(record.pixels, expected_pixels(inputs.root / "photos" / relative)), relative
    for relative, reason in inputs.folder["bad"].items():
        record = by_key[Path(relative).with_suffix("").as_posix()]
        assert record.kind == "failed" and reason.lower() in record.error.lower(), (relative, record.error)
    assert by_key["e"].pixels.shape == (3, SIZE, SIZE)
    # EXIF orientation 6: the 56 x 32 stored image is captioned upright (32 x 56), as Captioner does.
    upright = open_rgb(inputs.root / "photos" / "e.jpg", exif_transpose=True)
    assert upright.size == (32, 56)
    # 16-bit greyscale is rescaled, not clipped to white.
    assert by_key["sub/d"].pixels.std() > 0.3


def test_shard_and_parquet_records(inputs):
    sources = resolve_inputs([inputs.shards["pattern"], inputs.parquet["path"]], key_column="id")
    records = _records(ImageRecords(sources, eval_transform(SIZE), key_column="id"))
    images = {(record.location["shard"], record.key): record for record in records if "row" not in record.location}
    assert set(images) == set(inputs.shards["images"]) | {inputs.shards["no_image"]}
    for identity, payload in inputs.shards["images"].items():
        assert torch.equal(images[identity].pixels, expected_pixels(payload))
    missing = images[inputs.shards["no_image"]]
    assert missing.kind == "failed" and "no image member in the sample (has: json, txt)" in missing.error
    rows = [record for record in records if "row" in record.location]
    assert [(record.key, record.location["row"]) for record in rows] == [(f"img-{row}", row) for row in range(5)]
    for record in rows[:-1]:
        assert torch.equal(record.pixels, expected_pixels(inputs.parquet["images"][record.key]))
    assert rows[-1].kind == "failed" and "no image in column 'image'" in rows[-1].error
    # Without --key-column the key is FILE:ROW.
    plain = _records(ImageRecords(resolve_inputs([inputs.parquet["path"]]), eval_transform(SIZE)))
    assert [record.key for record in plain][:2] == ["table.parquet:0", "table.parquet:1"]


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 1), (2, 3), (3, 2), (1, 4)])
def test_ranks_and_workers_take_disjoint_complete_shares(inputs, monkeypatch, world_size, num_workers):
    sources = resolve_inputs([str(inputs.root / "photos"), inputs.shards["pattern"], inputs.parquet["path"]])
    everything = [record_id(record.meta()) for record in _records(ImageRecords(sources, lambda image: torch.zeros(1)))]
    assert len(everything) == len(set(everything)) == 10 + 7 + 5
    seen = []
    for rank in range(world_size):
        dataset = ImageRecords(sources, lambda image: torch.zeros(1), rank=rank, world_size=world_size)
        for worker in range(num_workers):
            seen += [record_id(record.meta()) for record in _records(dataset, monkeypatch, (worker, num_workers))]
    assert sorted(seen) == sorted(everything)


def test_done_images_are_skipped_before_decoding(inputs, monkeypatch):
    sources = resolve_inputs([str(inputs.root / "photos"), inputs.shards["pattern"]])
    first = _records(ImageRecords(sources, eval_transform(SIZE)))
    done = frozenset(record_id(record.meta()) for record in first[::2])
    decoded = []
    original = image_inputs.open_upright_rgb
    monkeypatch.setattr(image_inputs, "open_upright_rgb", lambda payload: decoded.append(payload) or original(payload))
    batch = collate_records(_records(ImageRecords(sources, eval_transform(SIZE), done=done)))
    assert batch.skipped == len(done)
    rest = [record.key for record in batch.images + batch.failed]
    assert sorted(rest) == sorted(record.key for record in first[1::2])
    assert len(decoded) == sum(1 for record in first[1::2] if record.error is None or "UnidentifiedImage" in
                               record.error or "truncated" in record.error or "bomb" in record.error)
    assert batch.pixels.shape == (len(batch.images), 3, SIZE, SIZE)


def test_damaged_shard_is_one_failure(tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "shards", count=1, per_shard=4)
    shard = tmp_path / "shards" / "00000.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) * 2 // 3])  # cut mid-member
    sources = resolve_inputs([str(shard)])
    for num_workers in (1, 3):  # one shard, several workers: each streams it, one reports the damage
        records = []
        for worker in range(num_workers):
            records += _records(ImageRecords(sources, eval_transform(SIZE)), monkeypatch, (worker, num_workers))
        failures = [record for record in records if record.kind == "failed" and record.key is None]
        assert len(failures) == 1 and "rest of the shard is unreadable" in failures[0].error
        assert 0 < len([record for record in records if record.kind == "image"]) < len(shards["images"])


def test_device_jpeg_decode_matches_pil(inputs):
    """The device path (here on the CPU: libjpeg-turbo, as PIL) gives the eval transform's pixels to within the
    two-pass resize's rounding; non-plain JPEGs (CMYK, EXIF-rotated) and PNGs are decoded in the worker."""
    sources = resolve_inputs([str(inputs.root / "photos"), inputs.shards["pattern"]])
    records = _records(ImageRecords(sources, eval_transform(SIZE), device_jpeg=True))
    jpegs = [record for record in records if record.jpeg is not None]
    assert {record.key for record in jpegs if "path" in record.location} == {"a"}  # not c (CMYK), e (rotated)
    assert len(jpegs) == 1 + len(inputs.shards["images"])
    pixels = image_inputs.decode_device_jpegs([record.jpeg for record in jpegs], [record.size for record in jpegs],
                                              torch.device("cpu"), SIZE)
    sources_bytes = [record.jpeg.numpy().tobytes() for record in jpegs]
    expected = torch.stack([expected_pixels(payload) for payload in sources_bytes])
    level = 1 / 255 / min(0.26130258, 0.26862954, 0.27577711)  # one 8-bit level after normalisation
    assert (pixels - expected).abs().max() <= level + 1e-5
    assert (pixels - expected).abs().gt(1e-5).float().mean() < 0.01


def test_share_size_is_known_where_cheap(inputs):
    glob_source = resolve_inputs([str(inputs.root / "photos" / "sub" / "*.png")])
    assert ImageRecords(glob_source, eval_transform(SIZE), rank=1, world_size=2).share_size() == 1
    table = resolve_inputs([inputs.parquet["path"]])  # row groups of 2, 2, 1: rank 0 takes groups 0 and 2
    assert ImageRecords(table, eval_transform(SIZE), rank=0, world_size=2).share_size() == 3
    assert ImageRecords(resolve_inputs([str(inputs.root / "photos")]), eval_transform(SIZE)).share_size() is None


def test_record_id_tells_same_key_in_different_places():
    a = record_id({"key": "x", "path": "p/x.jpg"})
    assert a != record_id({"key": "x", "path": "p/x.png"}) and a == record_id(json.loads(json.dumps(
        {"key": "x", "path": "p/x.jpg", "caption": "c"})))
    assert record_id({"key": "k", "shard": "a.tar"}) != record_id({"key": "k", "shard": "b.tar"})
