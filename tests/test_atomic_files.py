"""Files the project writes atomically (temp file + rename) get the umask's permissions, 0666 & ~umask, not the
temp file's 0600; a failed write leaves the earlier file and no temp file behind."""
import json
import os
import stat

import pytest
import torch

import utils


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_it_without_changing_it(umask):
    assert utils.current_umask() == umask
    assert utils.current_umask() == umask


def test_every_atomic_writer_gives_the_umasks_mode(tmp_path, umask):
    from models.checkpoint import save_checkpoint_file

    expected = 0o666 & ~umask
    utils.atomic_write_text(tmp_path / "a.txt", "text")
    utils.write_json(tmp_path / "b.json", {"x": 1})  # also eval_caption.py --out (metrics.score_results_file)
    with utils.atomic_open(tmp_path / "c.bin", "wb") as handle:
        handle.write(b"\0")
    save_checkpoint_file(tmp_path / "c.safetensors", {"w": torch.zeros(2)})
    for name in ("a.txt", "b.json", "c.bin", "c.safetensors"):
        assert _mode(tmp_path / name) == expected, (name, oct(_mode(tmp_path / name)))
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin", "c.safetensors"]


def test_a_failed_atomic_write_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "out.json"
    utils.write_json(path, {"old": True})
    with pytest.raises(RuntimeError, match="interrupted"):
        with utils.atomic_open(path, "w") as handle:
            handle.write('{"new": ')
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
