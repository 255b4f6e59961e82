"""hub.py: local paths pass straight through, HF_HUB_OFFLINE means the cache only, and an unreachable hub costs one
short probe, then the cached copy or one line naming the model and the config key. The real-process checks (a
closed proxy port, no HF_HUB_OFFLINE) are in tests/test_cli.py."""
from pathlib import Path

import pytest

import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A hub cache (HF_HUB_CACHE layout) holding ``files`` as the snapshot of ``repo_id``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return root


@pytest.fixture
def online(monkeypatch):
    """No HF_HUB_OFFLINE, whatever the test run sets (README's test command sets it)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_probe(monkeypatch):
    def forbidden(*args):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(hub, "_probe_hub", forbidden)
    monkeypatch.setattr(hub, "_probe_url", forbidden)


def test_names_are_paths_or_hub_ids(tmp_path):
    # cache/no_such_clip: shaped like owner/name, so a hub id while no such folder exists.
    for hub_id in ("gpt2", "bert-base-uncased", "openai/clip-vit-base-patch32", "cache/no_such_clip", "a_b/c.d-e"):
        assert not hub.must_be_local(hub_id) and hub.is_hub_id(hub_id)
    # Anything the hub would refuse as a model id ("Repo id must be in the form ...") is a path.
    for path in ("/abs/model", "./model", "../model", "~/model", "runs/toy/smile", "checkpoints/blip.pth",
                 "x.safetensors", "cache/toy/vocab.txt", "my clip/model", "models\\clip", "a--b", "-x/y", "x/y.",
                 "x" * 97):
        assert hub.must_be_local(path) and not hub.is_hub_id(path), path
    (tmp_path / "gpt2").mkdir()
    assert not hub.is_hub_id(str(tmp_path / "gpt2")) and not hub.is_hub_id("https://host/x.pth")


def test_local_folders_pass_straight_through_and_missing_paths_never_reach_the_hub(tmp_path, online, no_probe):
    assert hub.resolve(tmp_path, "eval.clip_model") == {}
    with pytest.raises(hub.MissingLocalPath, match=r"model.tokenizer 'runs/x/vocab.txt' not found"):
        hub.resolve("runs/x/vocab.txt", "model.tokenizer")
    # check_sources: every local path before any hub id, so the missing path is reported, not the hub.
    with pytest.raises(hub.MissingLocalPath, match="model.pretrained"):
        hub.check_sources([("model.tokenizer", "bert-base-uncased"), ("model.pretrained", "ckpt/none.pth"),
                           ("model.prefix.gpt2", {"n_layer": 2}), ("eval.ppl_model", None)])


def test_offline_uses_the_cache_only(tmp_path, monkeypatch, no_probe):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "cache_dir", lambda: tmp_path)
    with pytest.raises(hub.HubUnavailableError) as raised:
        hub.resolve("gpt2", "eval.ppl_model")
    message = str(raised.value)
    assert "eval.ppl_model 'gpt2'" in message and "HF_HUB_OFFLINE" in message and "local folder" in message
    assert "\n" not in message
    fake_cache(tmp_path, "gpt2", {"config.json": "{}"})
    assert hub.resolve("gpt2", "eval.ppl_model") == {"local_files_only": True}


def test_an_unreachable_hub_falls_back_to_the_cache_or_fails_in_one_line(tmp_path, monkeypatch, online):
    monkeypatch.setattr(hub, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "ConnectError: [Errno 111] Connection refused")
    with pytest.raises(hub.HubUnavailableError) as raised:
        hub.resolve("openai/clip-vit-base-patch32", "eval.clip_model")
    message = str(raised.value)
    for fragment in ("eval.clip_model 'openai/clip-vit-base-patch32'", "cannot be reached", "Connection refused",
                     "HF_HUB_OFFLINE=1", "local folder"):
        assert fragment in message
    assert "\n" not in message
    fake_cache(tmp_path, "openai/clip-vit-base-patch32", {"config.json": "{}"})
    assert hub.resolve("openai/clip-vit-base-patch32", "eval.clip_model") == {"local_files_only": True}
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)  # reachable: transformers downloads as usual
    assert hub.resolve("gpt2", "eval.ppl_model") == {}


def test_a_cache_only_load_that_finds_files_missing_is_one_line_too(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "cache_dir", lambda: tmp_path)
    fake_cache(tmp_path, "gpt2", {"config.json": "{}"})

    def loader(source, local_files_only=False):
        assert local_files_only
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files,\nand couldn't find them")

    with pytest.raises(hub.HubUnavailableError, match="eval.ppl_model 'gpt2'.*incomplete") as raised:
        hub.from_pretrained(loader, "gpt2", "eval.ppl_model")
    assert "\n" not in str(raised.value)


def test_the_hub_is_probed_once_per_process_with_a_short_timeout(monkeypatch, online, tmp_path):
    import huggingface_hub

    calls = []

    class Session:
        def head(self, url, timeout):
            calls.append((url, timeout))
            raise ConnectionError("refused")

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Session())
    monkeypatch.setattr(hub, "cache_dir", lambda: tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    hub._probe_hub.cache_clear()
    try:
        for name in ("gpt2", "bert-base-uncased", "gpt2"):
            with pytest.raises(hub.HubUnavailableError, match="hub.example: ConnectionError: refused"):
                hub.resolve(name, "model.tokenizer")
    finally:
        hub._probe_hub.cache_clear()
    assert calls == [("https://hub.example", hub.PROBE_TIMEOUT_S)]


def test_checkpoint_urls_are_checked_before_downloading(tmp_path, monkeypatch, online):
    from models.checkpoint import download

    monkeypatch.setattr(hub, "_probe_url", lambda origin, timeout: "URLError: Connection refused")
    with pytest.raises(hub.HubUnavailableError, match=r"model.pretrained https://host.example/m.pth cannot be "
                                                      r"downloaded: host.example cannot be reached"):
        download("https://host.example/m.pth", tmp_path)
    (tmp_path / "m.pth").write_bytes(b"cached")
    assert download("https://host.example/m.pth", tmp_path) == tmp_path / "m.pth"  # cached: no probe needed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnavailableError, match="HF_HUB_OFFLINE is set"):
        download("https://host.example/other.pth", tmp_path)
