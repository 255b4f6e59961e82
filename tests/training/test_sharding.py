"""train.sharding: fsdp (training/sharding.py): PyTorch FSDP2 over 2 gloo processes on CPU, the tiny toy BLIP.

FSDP2 works on CPU with gloo in torch 2.14, so this runs without a GPU. One torchrun launch of this file
(``_worker``, as ENTRY of scripts/train.sh) trains four FSDP runs in one process group and generates with the
sharded model; the test process then checks them against one process:
- a: 2 epochs of 2 steps (2 ranks x 4 images, micro-batches of 3 + 1, gradient clipping);
- b: the first epoch of a, then resumed under FSDP for the second epoch: its final checkpoint must equal a's bit for
  bit (same sharding, same reduction order, CPU kernels are deterministic);
- generation: each rank captions its own images, in a different number of batches (what validation does), with
  a's final sharded weights;
- scst: one SCST step (sampling before any training forward) and the trainer's validation, 3 / 2 images per rank.
The one-process reference trains with the same global batch (8). Its losses, gradient norms and parameters match
a's within 1e-5 relative (losses, norms) and 1e-5 absolute (parameters; measured: 2e-7, 1e-7 and 7e-7): the
reduce-scatter sums the two ranks' gradients in another order than one backward over 8 images, a float32 rounding
difference that AdamW's normalised update can magnify where a gradient is near zero. At lr 1e-3 an AdamW step moves
a parameter by up to ~1e-3, so 1e-5 still tells a right step from a wrong one (a missing or doubled gradient).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

PRETRAIN = REPO / "configs" / "toy" / "pretrain.yaml"
NUM_IMAGES = 5  # split 3 / 2 over the ranks, in batches of 2: rank 0 runs two generate calls, rank 1 one


def _images() -> torch.Tensor:
    return torch.rand(NUM_IMAGES, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _overrides(root: Path, name: str, batch_size: int, epochs: int, *extra: str) -> list[str]:
    return [f"data.toy_root={root / 'toy'}", f"data.train_files=[{root / 'train_subset.json'}]",
            f"output_dir={root / name}", "data.num_workers=0", f"train.batch_size={batch_size}",
            f"train.epochs={epochs}", "train.log_every=1", "train.validate=false", "train.test_after_training=false",
            "train.lr=1e-3", "train.schedule=constant", "train.checkpoint_every=0", "resume=false",
            "model.arch={preset: tiny, text_dropout: 0.0}", "eval.num_beams=2", "eval.max_length=12", *extra]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _worker() -> None:
    """torchrun entry (2 processes): runs a, the generation check, b, b resumed and scst; rank 0 writes $REPORT."""
    import training
    import utils
    from training.evaluation import generation_options
    from training.sharding import full_parameters

    root = Path(os.environ["ROOT"])
    fsdp = ["train.sharding=fsdp", "train.micro_batch_size=3"]

    def run(name, epochs, *extra):
        config = training.load_config(str(PRETRAIN), _overrides(root, name, 4, epochs, *fsdp, *extra))
        return config, training.run_training(training.resolve_data_paths(config))[1]

    utils.setup_logging(str(root / "a"))
    config, captioner = run("a", 2)
    images = _images()
    mine = list(range(utils.get_rank(), NUM_IMAGES, utils.get_world_size()))
    captions = {}
    with torch.no_grad(), full_parameters(captioner):  # as the trainer's validation: uneven loops over ranks
        for start in range(0, len(mine), 2):
            batch = mine[start:start + 2]
            captions.update(zip(batch, captioner.generate(images[batch], **generation_options(config))))
    gathered = utils.all_gather_object(captions)
    sharded = [type(p).__name__ for p in captioner.parameters()]
    run("b", 1)
    run("b", 2, "resume=true")  # the second epoch, resumed under FSDP from the FSDP checkpoint of the first
    # SCST samples through the sharded model before its first training forward (the 16 captions are 4 images:
    # one step of 2 x 2), and the trainer's validation generates 3 / 2 images on the two ranks.
    run("scst", 1, "train.batch_size=2", "train.validate=true", "eval.max_images=5", "data.train_per_image=true",
        "objective={scst: {samples: 2, max_tokens: 6, reward: cider_d}, smile: 0.1}",
        f"model.cache_dir={root / 'model_cache'}")
    if utils.is_main():
        merged = {int(i): text for part in gathered for i, text in part.items()}
        Path(os.environ["REPORT"]).write_text(json.dumps({
            "world_size": utils.get_world_size(), "captions": [merged[i] for i in range(NUM_IMAGES)],
            "parameter_types": sorted(set(sharded))}))
    utils.cleanup_distributed()


def test_fsdp_config_is_refused_with_lora():
    import utils
    from training.sharding import check_fsdp_config

    config = {"model": {"lora": {"r": 4}, "compile": None, "pretrained": "x"}, "train": {"sharding": "fsdp"}}
    with pytest.raises(utils.ConfigError, match="model.lora"):
        check_fsdp_config(config)


def test_repeated_blocks_are_the_transformer_layers():
    from models import BlipCaptioner
    from training.sharding import repeated_blocks

    captioner = BlipCaptioner.build("tiny", image_size=32, tokenizer=REPO / "tests" / "fixtures" / "vocab.txt")
    blocks = repeated_blocks(captioner.model)
    layer_lists = [m for m in captioner.model.modules() if isinstance(m, torch.nn.ModuleList)]
    assert blocks and all(type(b).__name__.endswith("Layer") for b in blocks)
    # Outermost lists only: nothing chosen lies inside another chosen block.
    assert len(blocks) == sum(len(m) for m in layer_lists if all(type(c) is type(m[0]) for c in m)
                              and not any(m in b.modules() for b in blocks))


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume_exactly(tmp_path):
    import train_caption
    from data import ensure_toy_dataset
    from models.checkpoint import load_checkpoint_file
    from models.inference import Captioner
    from training import build_captioner, load_config, resolve_data_paths
    from training.checkpoints import LATEST, load_weights
    from training.evaluation import generation_options

    paths = ensure_toy_dataset(tmp_path / "toy")
    entries = json.loads(Path(paths["train_file"]).read_text())[:16]  # 2 steps of 8 per epoch
    (tmp_path / "train_subset.json").write_text(json.dumps(entries))
    report = tmp_path / "report.json"
    env = {**os.environ, "NPROC": "2", "ENTRY": "tests/training/test_sharding.py", "REPORT": str(report),
           "ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    completed = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), str(PRETRAIN)], env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["world_size"] == 2 and result["parameter_types"] == ["DTensor"]  # really sharded

    one = train_caption.main(["--config", str(PRETRAIN),
                              *[f"--opt={o}" for o in _overrides(tmp_path, "one", 8, 2, "train.micro_batch_size=3")]])
    assert one["steps"] == 4
    losses = {name: [r["loss"] for r in _log(tmp_path / name / "log.jsonl") if r["kind"] == "train"]
              for name in ("a", "one")}
    norms = {name: [r["grad_norm"] for r in _log(tmp_path / name / "log.jsonl") if r["kind"] == "train"]
             for name in ("a", "one")}
    assert len(losses["a"]) == 4 and losses["a"] == pytest.approx(losses["one"], rel=1e-5)
    assert norms["a"] == pytest.approx(norms["one"], rel=1e-5)  # the global norm that clipping used, not a shard's

    state_a, tensors_a, meta_a = load_checkpoint_file(tmp_path / "a" / LATEST)
    state_one, tensors_one, _ = load_checkpoint_file(tmp_path / "one" / LATEST)
    assert state_a.keys() == state_one.keys()  # the same file layout as a one-process (or DDP) run
    def moments(tensors):
        return {key for key in tensors if key.startswith("optimizer/")}

    assert moments(tensors_a) == moments(tensors_one)
    worst = max((state_a[k].float() - state_one[k].float()).abs().max().item() for k in state_a)
    assert worst < 1e-5, worst

    # Resumed under FSDP from an FSDP checkpoint: bit-identical to the uninterrupted run.
    state_c, tensors_c, meta_c = load_checkpoint_file(tmp_path / "b" / LATEST)
    assert meta_c["progress"]["global_step"] == 4
    for key in state_a:
        assert torch.equal(state_a[key], state_c[key]), key
    for key in moments(tensors_a):
        assert torch.equal(tensors_a[key], tensors_c[key]), key

    scst = [r for r in _log(tmp_path / "scst" / "log.jsonl") if r["kind"] in ("train", "val")]
    assert [r["kind"] for r in scst] == ["train", "val"] and "loss_scst" in scst[0]
    validated = json.loads((tmp_path / "scst" / "val_epoch0_results.json").read_text())
    assert len({r["image_id"] for r in validated}) == len(validated) == 5

    # The FSDP checkpoint loads into one process, and generates there what the sharded model generated.
    config = resolve_data_paths(load_config(str(PRETRAIN), _overrides(tmp_path, "load", 8, 2)))
    captioner = build_captioner(config, torch.device("cpu"), load_weights=False).eval()
    load_weights(tmp_path / "a" / LATEST, captioner.model)
    with torch.no_grad():
        captions = captioner.generate(_images(), **generation_options(config))
    assert captions == result["captions"]
    settings = {k: v for k, v in generation_options(config).items() if k in ("num_beams", "max_length", "min_length")}
    loaded = Captioner.from_pretrained(tmp_path / "a" / LATEST, "cpu")
    assert loaded.caption_pixels(_images(), **settings) == result["captions"]


def test_fsdp_with_one_process_trains_the_model_whole(caplog):
    from models import BlipCaptioner
    from training.sharding import is_sharded, wrap_for_training

    captioner = BlipCaptioner.build("tiny", image_size=32, tokenizer=REPO / "tests" / "fixtures" / "vocab.txt")
    config = {"train": {"sharding": "fsdp"}, "model": {"lora": {}, "compile": None}}
    with caplog.at_level("INFO", logger="smile_blip"):
        assert wrap_for_training(captioner, config, torch.device("cpu")) is captioner
    assert not is_sharded(captioner) and "nothing to shard" in caplog.text


if __name__ == "__main__":
    _worker()
