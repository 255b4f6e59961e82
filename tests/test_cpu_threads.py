"""The CPU thread policy (utils.cpu_thread_count / configure_cpu_threads) and the DataLoader workers' threads."""
import logging

import pytest
import torch

import training
import utils


@pytest.fixture
def fresh_policy(monkeypatch):
    """No decision taken yet in this process, a fixed machine, and torch's thread count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(utils, "_cpu_snapshot", (4, 0.0, 4))  # 4 usable CPUs, idle, torch's default 4
    monkeypatch.setattr(utils, "_cpu_decision", None)
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(cpus=8), 8),
    (dict(cpus=8, workers=2), 6),                          # each worker takes a CPU
    (dict(cpus=2, workers=4), 1),                          # never below 1
    (dict(cpus=16, workers=2, local_world_size=4), 2),     # torchrun: 16 / 4 processes, less 2 workers each
    (dict(cpus=2, other_load=0.3), 2),                     # an idle machine's background noise
    (dict(cpus=2, other_load=0.8), 1),                     # one CPU mostly taken by another job
    (dict(cpus=2, other_load=9.0), 1),
    (dict(cpus=64, ceiling=32), 32),                       # never above torch's own default
])
def test_computed_share(kwargs, expected):
    threads, reason = utils.cpu_thread_count(**kwargs)
    assert threads == expected
    assert "usable CPU" in reason


def test_omp_num_threads_wins_over_the_computed_share_and_the_config_over_both():
    assert utils.cpu_thread_count(None, "3", cpus=2, workers=4, other_load=5.0) == (3, "OMP_NUM_THREADS=3")
    assert utils.cpu_thread_count(5, "3", cpus=2)[0] == 5
    for unusable in ("", "0", "2,1", "x"):  # not a positive integer: torch ignores it too, so the policy decides
        assert utils.cpu_thread_count(None, unusable, cpus=4, workers=1)[0] == 3


def test_configure_sets_torch_threads_and_logs_the_decision_once(fresh_policy, caplog):
    config = {"device": "cpu", "cpu_threads": None, "data": {"num_workers": 1}}
    with caplog.at_level(logging.INFO, logger="smile_blip"):
        assert utils.configure_cpu_threads(config) == 3
        assert utils.configure_cpu_threads(config) == 3  # a second run in the same process: same count, no log
    assert torch.get_num_threads() == 3
    assert [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()] == [
        "CPU threads: 3 (4 usable CPU(s), ~0.0 busy with other work (load average), 1 local process(es), "
        "1 DataLoader worker(s) each; set cpu_threads or OMP_NUM_THREADS to choose)"]


def test_configure_reads_the_environment_and_the_config(fresh_policy, monkeypatch):
    config = {"device": "cpu", "cpu_threads": None, "data": {"num_workers": 0}}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert utils.configure_cpu_threads(config) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert utils.configure_cpu_threads(config) == 1 == torch.get_num_threads()
    assert utils.configure_cpu_threads({**config, "cpu_threads": 3}) == 3 == torch.get_num_threads()


def test_configure_leaves_cuda_runs_alone_unless_asked(fresh_policy):
    torch.set_num_threads(2)
    assert utils.configure_cpu_threads({"device": "cuda", "cpu_threads": None, "data": {"num_workers": 8}}) == 2
    assert utils.configure_cpu_threads({"device": "cuda", "cpu_threads": 1, "data": {"num_workers": 8}}) == 1


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2"])
def test_a_bad_cpu_threads_is_a_config_error(fresh_policy, value):
    with pytest.raises(utils.ConfigError, match="cpu_threads must be a positive integer or null"):
        utils.configure_cpu_threads({"device": "cpu", "cpu_threads": value, "data": {"num_workers": 0}})


def test_cpu_threads_is_a_config_key():
    assert training.load_config("configs/toy/pretrain.yaml", ["cpu_threads=2"])["cpu_threads"] == 2
    assert training.load_config("configs/toy/pretrain.yaml")["cpu_threads"] is None


class _ThreadsSeen(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.get_num_threads()


def test_a_dataloader_worker_runs_one_thread(fresh_policy):
    """torch sets 1 thread in every DataLoader worker itself (its _worker_loop), whatever the main process uses,
    which is why the policy counts a worker as one CPU and the project's loaders need no worker_init_fn."""
    torch.set_num_threads(2)
    loader, _ = training.loaders._loader(_ThreadsSeen(), 2, False, lambda batch: batch, {"data": {"num_workers": 1}})
    assert [n for batch in loader for n in batch] == [1, 1, 1, 1]
    assert torch.get_num_threads() == 2
