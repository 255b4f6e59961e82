"""train.tensorboard: log records fanned out as scalars, the grad norm, and the error without tensorboard."""
import json
import sys
from pathlib import Path

import pytest
import torch

import train_caption
import utils
from data import ensure_toy_dataset

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO / "configs" / "toy" / "pretrain.yaml")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy dataset with a 32-caption training file: 4 steps of batch 8."""
    root = tmp_path_factory.mktemp("toy")
    paths = ensure_toy_dataset(root / "toy")
    train_file = root / "train_subset.json"
    train_file.write_text(json.dumps(json.loads(Path(paths["train_file"]).read_text())[:32]))
    return root, train_file


def _argv(toy, output_dir, *extra):
    root, train_file = toy
    overrides = [f"data.toy_root={root / 'toy'}", f"output_dir={output_dir}", "data.num_workers=0",
                 f"data.train_files=[{train_file}]", "train.batch_size=8", "train.epochs=1", "train.log_every=2",
                 "train.validate=false", "train.test_after_training=true", "eval.max_images=6",
                 "eval.metrics=[length, diversity]", "eval.max_length=8", "eval.num_beams=1",
                 "objective={mle: 0.5, smile: 0.5}", "train.tensorboard=true", *extra]
    return ["--config", PRETRAIN, *[item for override in overrides for item in ("--opt", override)]]


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def close(self):
        self.closed = True


def test_every_numeric_field_of_a_record_becomes_a_scalar_at_its_step(tmp_path):
    writer = FakeWriter()
    with utils.JsonlLogger(tmp_path / "log.jsonl", writer) as log:
        log.log(kind="train", epoch=0, step=50, loss=0.5, lr=1e-5, loss_smile=0.25, grad_norm=2.0,
                images_per_second=100.0)
        log.log(kind="val", epoch=0, step=60, num_images=5, CIDEr=1.25, METEOR=None, SPICE="n/a")
        log.log(kind="test", step=70, cap_len=11.0, flag=True)
        log.log(kind="nonfinite", epoch=0, step=71, image_ids=[1, 2])
    assert writer.closed
    assert writer.scalars == [
        ("train/loss", 0.5, 50), ("train/lr", 1e-5, 50), ("train/loss_smile", 0.25, 50),
        ("train/grad_norm", 2.0, 50), ("train/images_per_second", 100.0, 50),
        ("val/num_images", 5.0, 60), ("val/CIDEr", 1.25, 60),  # None and str are left out
        ("test/cap_len", 11.0, 70),  # so is a bool
    ]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["train", "val", "test", "nonfinite"]


def test_global_grad_norm_equals_the_naive_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    unused = torch.nn.Parameter(torch.ones(4))  # no gradient: left out
    model(torch.randn(8, 5)).pow(2).sum().backward()
    naive = torch.sqrt(sum(p.grad.norm() ** 2 for p in model.parameters()))
    norm = utils.global_grad_norm([*model.parameters(), unused])
    assert norm.dim() == 0 and norm.item() == pytest.approx(naive.item(), rel=1e-6)
    # It is what clip_grad_norm_ measures (and, unlike it, leaves the gradients alone).
    grads = [p.grad.clone() for p in model.parameters()]
    assert norm.item() == pytest.approx(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item(), rel=1e-6)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert utils.global_grad_norm([unused]).item() == 0.0


def test_tensorboard_without_the_package_fails_at_start_naming_key_and_install(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    with pytest.raises(utils.ConfigError) as error:
        train_caption.main(_argv(toy, tmp_path / "run"))
    message = str(error.value)
    assert "train.tensorboard" in message and "pip install -r requirements-extra.txt" in message
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing was started (train.log aside)


def test_training_writes_the_log_records_as_tensorboard_scalars(toy, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="train.tensorboard needs the optional tensorboard package "
                                              "(pip install -r requirements-extra.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The grad norm is computed on logged steps only (2 and 4 of 4), not on every step.
    norm_calls = []
    counted = utils.global_grad_norm
    monkeypatch.setattr(utils, "global_grad_norm", lambda parameters: norm_calls.append(1) or counted(parameters))
    run = tmp_path / "run"
    # Without clipping (the toy pre-training clips, which computes the norm every step anyway).
    summary = train_caption.main([*_argv(toy, run), "--opt", "train.grad_clip=null"])
    assert summary["steps"] == 4 and len(norm_calls) == 2

    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(r["grad_norm"] > 0 and r["images_per_second"] > 0 for r in train)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_second", "train/loss_mle",
            "train/loss_smile", "epoch/loss", "test/cap_len", "test/distinct_1"} <= tags
    for field in ("loss", "lr", "grad_norm", "images_per_second", "loss_mle", "loss_smile"):
        scalars = events.Scalars(f"train/{field}")
        assert [s.step for s in scalars] == [2, 4], field
        # TensorBoard stores float32.
        assert [s.value for s in scalars] == pytest.approx([r[field] for r in train], rel=1e-6), field
    test = next(r for r in records if r["kind"] == "test")
    assert [(s.step, s.value) for s in events.Scalars("test/cap_len")] == [(4, pytest.approx(test["cap_len"]))]
    assert (run / "test_caption_lengths.png").read_bytes()[:4] == b"\x89PNG"

    # Resumed for a second epoch, the run adds steps 6 and 8; what was logged up to its checkpoint (step 4) stays,
    # once (a resume purges only the steps after the checkpoint, which it logs again).
    train_caption.main(_argv(toy, run, "train.epochs=2", "resume=true"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [s.value for s in events.Scalars("train/loss")][:2] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [s.step for s in events.Scalars("test/cap_len")] == [4, 8]

    # Starting the run over replaces its curves instead of adding a second set beside them.
    train_caption.main(_argv(toy, run, "train.max_steps=2", "train.test_after_training=false", "resume=false",
                            "overwrite=true"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [2]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
