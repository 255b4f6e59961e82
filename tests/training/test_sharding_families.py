"""train.sharding: fsdp (training/sharding.py) for the prefix (ClipCap) and vlm families, and resuming across DDP,
FSDP and one process: 2 gloo processes on CPU, tiny random models, 2 epochs of 2 steps.

tests/training/test_sharding.py checks the BLIP family; this file checks that the same machinery holds for the
others (their FSDP units are their transformers' repeated blocks, found generically; the prefix family keeps its
frozen CLIP tower whole, ``PrefixCaptioner.fsdp_replicated``, because the feature cache runs it on one rank outside
``forward``), and that a checkpoint is one format whatever wrote it. Per family, one torchrun launch of this file
(``_worker``, as ENTRY of scripts/train.sh) runs, in one process group:

- ``fsdp``: 2 epochs under FSDP (2 ranks x 4 images, micro-batches of 3 + 1, gradient clipping), then captions 5
  images split 3 / 2 over the ranks in batches of 2 (uneven generation loops, as validation);
- ``ddp_e1`` (DDP, 1 epoch) resumed under FSDP for epoch 2: ``ddp_to_fsdp``;
- ``fsdp_e1`` (FSDP, 1 epoch) resumed under DDP: ``fsdp_to_ddp``;
- ``one_e1`` (one process, 1 epoch, written by the test before the launch) resumed under FSDP: ``one_to_fsdp``.

The test process then trains ``one`` (2 epochs, one process, the same global batch of 8) and resumes ``fsdp_e1`` in
one process (``fsdp_to_one``). Every 2-epoch run must match ``one``: losses and gradient norms within 1e-5
relative, parameters within 1e-5 absolute, AdamW moments within 1e-7 absolute, with the same optimizer-state keys
(measured on this machine, torch 2.14 CPU, worst over the five runs: losses 1.6e-7 / 7e-8 (prefix / vlm), norms
4.2e-7 / 1.2e-7, parameters 7e-7 / 2.9e-6, moments 2.2e-8 / 7.5e-9). The difference is float32 rounding: two
ranks' gradients are summed in another order than one backward over 8 images, and AdamW's normalised step magnifies
it where a gradient is near zero; at lr 1e-3 a step moves a parameter by up to 1e-3, so 1e-5 still tells a right
step from a missing or doubled one. The FSDP checkpoint also loads into one process (``Captioner.from_pretrained``)
and captions there as the sharded model did.

The vlm family uses a tiny LLaVA whose LM head is tied to its word embeddings (as SmolVLM's), the case where a
family drops the second name from its state dict; its CLIP ``post_layernorm`` gets no gradient, which DDP must be
told of (``VlmCaptioner.ddp_find_unused_parameters``) and which must have no AdamW state after a resume under FSDP
(torch's loader gives every parameter one; ``load_full_optimizer_state`` removes it again).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

PRETRAIN = REPO / "configs" / "toy" / "pretrain.yaml"
FAMILIES = ("prefix", "vlm")
NUM_IMAGES = 5  # split 3 / 2 over the ranks, in batches of 2: rank 0 runs two generate calls, rank 1 one
# Dropout off: the ranks draw from their own RNG streams, which one process cannot repeat.
GPT2 = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 453, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0}
CLIP = {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "projection_dim": 16}
# Parameters within this (absolute), losses and gradient norms within this (relative): see the module docstring.
TOLERANCE = 1e-5
MOMENT_TOLERANCE = 1e-7


def _model_section(root: Path, family: str) -> list[str]:
    if family == "prefix":  # the transformer mapper, so that three kinds of repeated blocks meet FSDP
        prefix = {"gpt2": GPT2, "clip": CLIP, "tokenizer": str(root / "gpt2_tokenizer"), "prefix_length": 2,
                  "mapping_type": "transformer", "clip_length": 2, "num_layers": 2, "num_heads": 2,
                  "stop_token": None}
        return ["model.family=prefix", "model.image_size=32", f"model.prefix={json.dumps(prefix)}"]
    return ["model.family=vlm", f"model.pretrained={root / 'tiny_llava_tied'}", "model.image_size=32"]


def _overrides(root: Path, family: str, name: str, batch_size: int, epochs: int, *extra: str) -> list[str]:
    return [f"data.toy_root={root.parent / 'toy'}", f"data.train_files=[{root.parent / 'train_subset.json'}]",
            f"output_dir={root / name}", f"data.feature_cache_dir={root / 'features'}", "data.num_workers=0",
            f"train.batch_size={batch_size}", f"train.epochs={epochs}", "train.micro_batch_size=3",
            "train.log_every=1", "train.validate=false", "train.test_after_training=false", "train.lr=1e-3",
            "train.schedule=constant", "train.checkpoint_every=0", "resume=false", "model.max_text_length=12",
            "eval.num_beams=2", "eval.max_length=6", *_model_section(root, family), *extra]


def _train(root: Path, family: str, name: str, batch_size: int, epochs: int, *extra: str):
    import training

    config = training.load_config(str(PRETRAIN), _overrides(root, family, name, batch_size, epochs, *extra))
    return config, training.run_training(training.resolve_data_paths(config))[1]


def _gpt2_tokenizer(folder: Path) -> Path:
    """The original ClipCap fixture's tiny GPT-2 BPE (453 ids) as a tokenizer folder."""
    folder.mkdir(parents=True)
    fixtures = REPO / "tests" / "fixtures" / "clipcap_original"
    shutil.copy(fixtures / "gpt2_vocab.json", folder / "vocab.json")
    shutil.copy(fixtures / "gpt2_merges.txt", folder / "merges.txt")
    return folder


def _images() -> torch.Tensor:
    return torch.rand(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _worker() -> None:
    """torchrun entry (2 processes): the FSDP and DDP runs of the module docstring; rank 0 writes $REPORT."""
    import utils
    from training.evaluation import generation_options
    from training.sharding import full_parameters

    root, family = Path(os.environ["ROOT"]), os.environ["FAMILY"]
    started = time.perf_counter()

    def run(name, epochs, sharding, *extra):
        return _train(root, family, name, 4, epochs, f"train.sharding={sharding}", *extra)

    def resume(source, name, sharding):
        if utils.is_main():
            shutil.copytree(root / source, root / name)
        utils.barrier()
        run(name, 2, sharding, "resume=true")

    # Its own feature cache folder: the prefix family's cache is built under FSDP, by one rank.
    config, captioner = run("fsdp", 2, "fsdp", f"data.feature_cache_dir={root / 'features_fsdp'}")
    kinds = {name: type(p).__name__ for name, p in captioner.named_parameters()}
    images = _images()
    mine = list(range(utils.get_rank(), NUM_IMAGES, utils.get_world_size()))
    captions = {}
    with torch.no_grad(), full_parameters(captioner):
        for start in range(0, len(mine), 2):
            batch = mine[start:start + 2]
            captions.update(zip(batch, captioner.generate(images[batch], **generation_options(config))))
    gathered = utils.all_gather_object(captions)
    run("ddp_e1", 1, "ddp")
    resume("ddp_e1", "ddp_to_fsdp", "fsdp")
    run("fsdp_e1", 1, "fsdp")
    resume("fsdp_e1", "fsdp_to_ddp", "ddp")
    resume("one_e1", "one_to_fsdp", "fsdp")
    if utils.is_main():
        merged = {int(i): text for part in gathered for i, text in part.items()}
        Path(os.environ["REPORT"]).write_text(json.dumps({
            "world_size": utils.get_world_size(), "captions": [merged[i] for i in range(NUM_IMAGES)],
            "parameter_kinds": kinds, "seconds": time.perf_counter() - started}))
    utils.cleanup_distributed()


def test_prefix_family_keeps_only_its_frozen_tower_whole(tmp_path):
    from models.prefix_captioner import PrefixCaptioner
    from training.sharding import _outside, repeated_blocks, replicated_parameters

    tokenizer = _gpt2_tokenizer(tmp_path / "gpt2_tokenizer")
    options = {"mapping_type": "transformer", "clip_length": 2, "num_layers": 2, "num_heads": 2, "prefix_length": 2}
    captioner = PrefixCaptioner.build(GPT2, CLIP, tokenizer=tokenizer, prefix=options)
    vision = captioner.model.vision
    assert captioner.fsdp_replicated() == [vision]
    replicated = replicated_parameters(captioner)
    assert {id(p) for p in replicated} == {id(p) for p in vision.parameters()}
    blocks = _outside(repeated_blocks(captioner.model), replicated)
    # GPT-2's h and the mapper's layers are FSDP units; the CLIP layers stay inside the whole tower.
    assert sorted({type(block).__name__ for block in blocks}) == ["GPT2Block", "MapperLayer"]
    assert len(blocks) == GPT2["n_layer"] + options["num_layers"]

    trained = PrefixCaptioner.build(GPT2, CLIP, tokenizer=tokenizer, prefix={**options, "train_vision": True})
    assert trained.fsdp_replicated() == [] and replicated_parameters(trained) == set()
    trained.fsdp_replicated = lambda: [trained.model.vision]  # a family naming a trained module: refused
    with pytest.raises(ValueError, match="model.vision.*only frozen modules"):
        replicated_parameters(trained)


@pytest.mark.parametrize("model_section, key", [({"lora": {"r": 4}, "compile": None, "pretrained": "x"}, "model.lora"),
                                                ({"lora": {}, "compile": "full"}, "model.compile")])
def test_fsdp_still_refuses_lora_and_compile(model_section, key):
    import utils
    from training.sharding import check_fsdp_config

    with pytest.raises(utils.ConfigError, match=key):
        check_fsdp_config({"model": model_section, "train": {"sharding": "fsdp"}})


@pytest.fixture(scope="module")
def toy_subset(tmp_path_factory) -> Path:
    """The toy set and a 16-caption training file (2 steps of 8 per epoch), shared by both families."""
    from data import ensure_toy_dataset

    base = tmp_path_factory.mktemp("sharding_families")
    paths = ensure_toy_dataset(base / "toy")
    entries = json.loads(Path(paths["train_file"]).read_text())[:16]
    (base / "train_subset.json").write_text(json.dumps(entries))
    return base


def _train_log(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _differences(run: Path, reference: Path) -> dict[str, float]:
    """Largest differences of ``run`` from ``reference``: losses and gradient norms (relative, over the steps both
    logged), parameters and AdamW moments (absolute, final checkpoints; the same keys required)."""
    from models.checkpoint import load_checkpoint_file
    from training.checkpoints import LATEST

    logs = {r["step"]: r for r in _train_log(run)}
    expected = {r["step"]: r for r in _train_log(reference)}
    assert logs and set(logs) <= set(expected), (sorted(logs), sorted(expected))
    state, tensors, meta = load_checkpoint_file(run / LATEST)
    state_ref, tensors_ref, meta_ref = load_checkpoint_file(reference / LATEST)
    assert meta["progress"]["global_step"] == meta_ref["progress"]["global_step"] == 4
    assert state.keys() == state_ref.keys()
    moments = sorted(k for k in tensors_ref if k.startswith("optimizer/") and tensors_ref[k].is_floating_point())
    assert moments and moments == sorted(k for k in tensors if k.startswith("optimizer/")
                                         and tensors[k].is_floating_point())

    def relative(key):
        return max(abs(logs[s][key] - expected[s][key]) / abs(expected[s][key]) for s in logs)

    return {"loss": relative("loss"), "grad_norm": relative("grad_norm"),
            "parameters": max((state[k].float() - state_ref[k].float()).abs().max().item() for k in state),
            "moments": max((tensors[k] - tensors_ref[k]).abs().max().item() for k in moments)}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_matches_one_process_and_resumes_across_ddp_fsdp_and_one_process(family, toy_subset):
    from models.inference import Captioner
    from tests.models.tiny_vlms import save_tiny_vlm
    from training.checkpoints import LATEST
    from training.evaluation import generation_options

    root = toy_subset / family
    root.mkdir()
    if family == "prefix":
        _gpt2_tokenizer(root / "gpt2_tokenizer")
    else:
        save_tiny_vlm("llava", root / "tiny_llava_tied", tied=True)
    started = time.perf_counter()
    _train(root, family, "one_e1", 8, 1)  # resumed under FSDP by the worker
    print(f"one_e1 {time.perf_counter() - started:.1f} s")

    report = root / "report.json"
    env = {**os.environ, "NPROC": "2", "ENTRY": "tests/training/test_sharding_families.py", "REPORT": str(report),
           "ROOT": str(root), "FAMILY": family, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    launched = time.perf_counter()
    completed = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), str(PRETRAIN)], env=env,
                               capture_output=True, text=True, timeout=300)
    launched = time.perf_counter() - launched
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["world_size"] == 2
    kinds = result["parameter_kinds"]
    if family == "prefix":  # the frozen CLIP tower is kept whole on every rank; the mapper and GPT-2 are sharded
        assert {kind for name, kind in kinds.items() if name.startswith("model.vision.")} == {"Parameter"}
        assert {kind for name, kind in kinds.items() if not name.startswith("model.vision.")} == {"DTensor"}
        assert list((root / "features_fsdp").glob("*.safetensors")), "the FSDP run built no feature cache"
    else:
        assert set(kinds.values()) == {"DTensor"}

    config, _ = _train(root, family, "one", 8, 2)
    shutil.copytree(root / "fsdp_e1", root / "fsdp_to_one")
    _train(root, family, "fsdp_to_one", 8, 2, "resume=true")

    worst = {}
    for run in ("fsdp", "ddp_to_fsdp", "fsdp_to_ddp", "one_to_fsdp", "fsdp_to_one"):
        differences = _differences(root / run, root / "one")
        worst = {key: max(worst.get(key, 0.0), value) for key, value in differences.items()}
        assert differences["loss"] < TOLERANCE and differences["grad_norm"] < TOLERANCE, (run, differences)
        assert differences["parameters"] < TOLERANCE and differences["moments"] < MOMENT_TOLERANCE, (run, differences)
    print(f"{family}: worst differences from one process {worst}; torchrun launch {launched:.1f} s, of which the "
          f"runs {result['seconds']:.1f} s")

    # The FSDP checkpoint (the one-process layout, _differences checked its keys) loads into one process and
    # captions there as the sharded model did.
    settings = {k: v for k, v in generation_options(config).items() if k in ("num_beams", "max_length", "min_length")}
    loaded = Captioner.from_pretrained(root / "fsdp" / LATEST, "cpu")
    assert loaded.caption_pixels(_images(), **settings) == result["captions"]


if __name__ == "__main__":
    _worker()
