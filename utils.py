"""Project-independent helpers: YAML configs with inheritance, distributed no-op-able wrappers, logging, schedules.

Imports nothing from this repository, so every layer can use it.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml

logger = logging.getLogger("smile_blip")

# ---------------------------------------------------------------------------------------------------------------
# Config: a YAML file may name a `base:` file (relative to itself); keys merge recursively, the child winning.
# Every key must exist in the defaults file with a compatible type, so a typo fails at start-up.
# ---------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it and lists the valid choices."""


# ---------------------------------------------------------------------------------------------------------------
# Entry points: the project's own user-facing errors as one line on stderr, exit status 2 (argparse's), no
# traceback; anything unexpected keeps its traceback. SMILE_TRACEBACK=1 shows the traceback for all of them.
# ---------------------------------------------------------------------------------------------------------------

TRACEBACK_ENV = "SMILE_TRACEBACK"
USER_ERROR_STATUS = 2


def run_cli(main, user_errors: tuple[type[BaseException], ...], argv: list[str] | None = None,
            prog: str | None = None) -> int:
    """Run ``main(argv)``; return 0, or ``USER_ERROR_STATUS`` after printing a ``user_errors`` error as one line.

    Under torchrun every rank exits with the status but only rank 0 prints (the ranks usually fail alike, e.g. on a
    config error); torchrun then ends the job. Use as ``sys.exit(utils.run_cli(main, USER_ERRORS))``.
    """
    try:
        main(argv)
    except user_errors as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            name = prog or Path(sys.argv[0]).name
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"{name}: error: {message} (set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(content).__name__}")
    return content


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; mappings merge, anything else in ``override`` replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml_with_bases(path: str | Path, _seen: tuple = ()) -> dict:
    """A config file with its ``base:`` chain resolved (the base path is relative to the file naming it)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config inheritance loops: {' -> '.join(map(str, _seen + (path,)))}")
    content = _read_yaml(path)
    base = content.pop("base", None)
    if base is None:
        return content
    return merge(load_yaml_with_bases(path.parent / base, _seen + (path,)), content)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML, so numbers, booleans, lists and null work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like KEY=VALUE (dotted keys for nested values)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    config = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        set_by_path(config, keys, value, what=f"override {text!r}")
    return config


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def validate(config: dict, defaults: dict, free_form: set[str] = frozenset(), _prefix: str = "") -> None:
    """Every key of ``config`` must exist in ``defaults`` with a compatible type.

    A default of ``null`` accepts anything. A float default accepts an int or a numeric string such as ``1e-5``
    (which YAML 1.1 leaves a string) and converts it in place. Keys listed in ``free_form`` (dotted) are not
    checked below themselves.
    """
    for key, value in config.items():
        dotted = f"{_prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {sorted(defaults)}")
        default = defaults[key]
        if dotted in free_form or default is None or value is None:
            continue
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} must be a mapping with keys {sorted(default)}, got {value!r}")
            validate(value, default, free_form, dotted + ".")
        elif isinstance(default, bool) or isinstance(value, bool):
            if not (isinstance(default, bool) and isinstance(value, bool)):
                raise ConfigError(f"config key {dotted!r} must be {_type_name(default)}, got {value!r}")
        elif isinstance(default, float) and isinstance(value, int):
            config[key] = float(value)
        elif isinstance(default, float) and isinstance(value, str) and _is_float(value):
            config[key] = float(value)  # PyYAML (YAML 1.1) reads 1e-5 as a string; 1.0e-5 would be a float
        elif not isinstance(value, type(default)):
            raise ConfigError(f"config key {dotted!r} must be {_type_name(default)}, got {_type_name(value)} {value!r}")


def load_config(path: str | Path, overrides: Iterable[str] = (), defaults_path: str | Path | None = None,
                free_form: set[str] = frozenset(), upgrade: Callable[[dict], dict] | None = None) -> dict:
    """The resolved config: defaults <- file (with its bases) <- ``--opt`` overrides, validated.

    ``upgrade(content) -> content`` sees the keys the file and the overrides set, before validation: the caller's
    chance to move keys of an older layout to their new place (and warn).
    """
    defaults = _read_yaml(Path(defaults_path)) if defaults_path else {}
    content = apply_overrides(load_yaml_with_bases(path), overrides)
    if upgrade is not None:
        content = upgrade(content)
    if defaults_path:
        validate(content, defaults, free_form)
    return merge(defaults, content)


_REQUIRED = object()


def get_by_path(config: dict, dotted: str, default: Any = _REQUIRED) -> Any:
    """The value at ``dotted`` (``"train.lr"``); where the path is missing (or runs into a non-mapping), ``default``
    when one is given, else KeyError."""
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            if default is _REQUIRED:
                raise KeyError(dotted)
            return default
        node = node[key]
    return node


def set_by_path(config: dict, keys: Sequence[str], value: Any, what: str | None = None) -> None:
    """Set ``config[k0][k1]...[kn] = value``, creating missing sections; a key on the way that holds a value rather
    than a section is a ConfigError naming ``what`` (default: the dotted key)."""
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what or '.'.join(keys)}: {key!r} is not a section")
    node[keys[-1]] = value


def require_path(key: str, value: Any, folder: bool = False) -> None:
    """Raise a `ConfigError` naming ``key`` when the file (or, with ``folder``, the folder) ``value`` is missing."""
    path = Path(str(value)).expanduser()
    if not (path.is_dir() if folder else path.exists()):
        what = "folder" if folder else "file"
        raise ConfigError(f"{key}: {what} {value} not found ({path.absolute()})")


def parse_weighted_spec(spec: Any, what: str, valid_options: dict[str, list[str]], key: str | None = None,
                        non_negative: bool = False) -> list[tuple[str, float, dict]]:
    """A weighted mixture as YAML writes it -> ``[(name, weight, options), ...]`` in the spec's order.

    The one parser of the project's mixtures (training objectives, SCST rewards). Accepted forms::

        smile                                          # one name, weight 1
        {mle: 0.01, smile: 0.99}                       # name -> weight
        {smile: {weight: 0.99, first_token_mle: false}, mle: 0.01}   # name -> weight and options

    Args:
        spec: the YAML value.
        what: what a name is ("objective", "reward"), for the messages.
        valid_options: every valid name -> the option names it accepts (besides ``weight``).
        key: the config key the spec sits at (``objective.scst.reward``), named in each message; default ``what``.
        non_negative: reject negative weights too.

    Raises ValueError naming the key, the name and the value, and listing the valid choices.
    """
    from collections.abc import Mapping

    key = key or what
    names = sorted(valid_options)
    if isinstance(spec, str):
        spec = {spec: 1.0}
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"{key} must be a name or a mapping name -> weight/options, got {spec!r}; "
                         f"valid names: {names}")
    parsed = []
    for name, value in spec.items():
        if name not in valid_options:
            raise ValueError(f"{key}: unknown {what} {name!r}; valid names: {names}")
        options = dict(value) if isinstance(value, Mapping) else {}
        weight = options.pop("weight", 1.0) if isinstance(value, Mapping) else value
        if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or math.isnan(weight)
                or (non_negative and weight < 0)):
            kind = "a non-negative number" if non_negative else "a number"
            raise ValueError(f"{key}.{name}: weight must be {kind}, got {weight!r}")
        unknown = sorted(set(options) - set(valid_options[name]))
        if unknown:
            raise ValueError(f"{key}.{name}: unknown option(s) {unknown}; "
                             f"valid options: {['weight', *valid_options[name]]}")
        parsed.append((name, float(weight), options))
    return parsed


# ---------------------------------------------------------------------------------------------------------------
# Distributed: everything degrades to a no-op in a plain single process.
# ---------------------------------------------------------------------------------------------------------------


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), or stay single-process.

    nccl when the device is CUDA, gloo otherwise (so a CPU run under torchrun works too). Returns this
    process's device.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch_device if backend == "nccl" else None,
        )
    return torch_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank; before the group is joined, torchrun's RANK variable (0 in a plain process)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order; ``[value]`` in a single process."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (rank 0 decides, the others follow)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / get_world_size()


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------------------------
# Seeds, logging, files, schedules
# ---------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(output_dir: str | Path | None = None, log_name: str = "train.log") -> None:
    """Rank 0 logs INFO to the console (and ``output_dir/log_name``); other ranks log warnings only.

    eval_caption.py passes its own ``log_name`` (``eval_<split>.log``), so evaluating into a training run's folder
    never appends to that run's ``train.log``.
    """
    level = logging.INFO if is_main() else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if output_dir is not None and is_main():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / log_name))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` (created if needed; POSIX only) for the ``with`` block.

    What several processes (torchrun ranks, parallel jobs) build on first use -- the toy set, the toy CLIP and
    GPT-2, a feature cache -- is built by the first one in while the others wait, then reused. The lock file is
    never deleted: removing it while another process waits on it would let a third lock a fresh inode and build
    concurrently.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_folder(folder: str | Path, write: Callable[[Path], Any]) -> Any:
    """Build ``folder`` so that no reader ever sees it half-written: ``write(tmp)`` fills a temporary sibling, which
    then replaces ``folder`` by renames; returns what ``write`` returned. Hold ``exclusive_lock`` around the call:
    leftovers of a builder that was killed are removed first, and an existing ``folder`` is only replaced once the
    new one is complete.
    """
    folder = Path(folder)
    prefix = f".{folder.name}.building-"
    for leftover in folder.parent.glob(f"{prefix}*"):  # the lock is held: nobody else is building
        shutil.rmtree(leftover, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        result = write(building)
        os.chmod(building, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        if folder.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
            os.rename(folder, stale / "old")
            os.rename(building, folder)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(building, folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return result


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status).

    ``os.umask`` can only be read by setting it; between the two calls another thread (the metrics session's
    workers, DataLoader threads) would create its files with mode 0666, so that is the fallback only.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def publish_file(temporary: str | Path, path: str | Path) -> None:
    """Rename a finished temp file into place with ordinary permissions.

    mkstemp and NamedTemporaryFile create files readable by their owner only (0600); results, metrics and
    checkpoints should get the same permissions as any other file the user writes (0666 minus the umask).
    Every atomic write of the project ends here (`atomic_open`, `atomic_write_text`, `write_json`).
    """
    os.chmod(temporary, 0o666 & ~current_umask())
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[Any]:
    """``open(path, mode)`` for writing, made atomic: the ``with`` block fills a temp file in the same folder,
    which replaces ``path`` (with the umask's permissions, `publish_file`) only when the block ends without an
    error; on an error it is removed and any earlier ``path`` is unchanged. ``kwargs`` go to ``open``
    (``encoding=``, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, **kwargs) as handle:
            yield handle
        publish_file(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: str | Path, payload: Any, indent: int | None = 2) -> None:
    """The project's one JSON writer: atomic (`atomic_write_text`), newline-terminated; ``indent=None`` writes one
    compact line (large annotation files)."""
    atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")


class JsonlLogger:
    """Appends one JSON object per line; only rank 0 writes.

    With a TensorBoard writer (`open_tensorboard`), each record is also written there: every numeric field
    ``F`` of a record of kind ``K`` becomes the scalar ``K/F`` at x = the record's ``step``, so the JSONL file
    and TensorBoard always hold the same numbers under the same names (``train/loss``, ``val/CIDEr``, ...).
    ``kind``, ``epoch`` and ``step`` are the record's coordinates, not scalars; lists, strings, booleans and None
    are left out. Close the logger (or use it as a context manager) to flush the writer.
    """

    COORDINATES = ("kind", "epoch", "step")

    def __init__(self, path: str | Path, tensorboard: Any = None):
        self.path = Path(path)
        self.tensorboard = tensorboard if is_main() else None

    def log(self, **record: Any) -> None:
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None and "kind" in record and "step" in record:
            for name, value in tensorboard_scalars(record).items():
                self.tensorboard.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """``{"<kind>/<field>": value}`` for the numeric (int or float, not bool) fields of a log record."""
    kind = record["kind"]
    return {f"{kind}/{name}": float(value) for name, value in record.items()
            if name not in JsonlLogger.COORDINATES and isinstance(value, (int, float)) and not isinstance(value, bool)}


TENSORBOARD_MISSING = ("train.tensorboard: true needs the tensorboard package, which is not installed. Install the "
                       "optional extras with `pip install -r requirements-extra.txt`, or set train.tensorboard: false.")


def require_tensorboard() -> None:
    """Raise ConfigError naming the key and the install command when tensorboard cannot be imported.

    Imports ``tensorboard`` itself, not only ``torch.utils.tensorboard``: torch's wrapper may already sit in
    ``sys.modules`` from an earlier import, and it is tensorboard that writes the event files.
    """
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"{TENSORBOARD_MISSING} ({error})") from None


def open_tensorboard(log_dir: str | Path, purge_step: int | None = None):
    """A ``SummaryWriter`` on ``log_dir`` on rank 0, None on the other ranks.

    ``purge_step``: a resumed run passes the step after the one it resumes from, so that TensorBoard hides the
    events the interrupted run wrote after its last checkpoint (they are written again, and would otherwise show
    twice).
    """
    require_tensorboard()
    if not is_main():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def global_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of all parameters' gradients taken together (what ``clip_grad_norm_`` clips), as a 0-dim tensor.

    Stays on the device (no host sync) until the caller reads it. Parameters without a gradient are left out;
    0 when none has one. Accumulates in float32, whatever the gradients' dtype.
    """
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return torch.linalg.vector_norm(norms)


def linear_warmup_lr(step: float, total: float, warmup: float, base_lr: float) -> float:
    """0 -> ``base_lr`` linearly over ``warmup`` steps, then linearly down to 0 at ``total`` (transformers'
    ``get_linear_schedule_with_warmup``, which ClipCap trains with)."""
    if step < warmup:
        return base_lr * step / max(warmup, 1)
    return base_lr * max(0.0, (total - step) / max(total - warmup, 1))


def cosine_lr(step_or_epoch: float, total: float, base_lr: float, min_lr: float = 0.0) -> float:
    """BLIP's cosine schedule: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2``."""
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step_or_epoch / max(total, 1)))


# ---------------------------------------------------------------------------------------------------------------
# CPU threads. torch sizes its intra-op pool to the machine's cores, ignoring the affinity mask, a container's
# CPU quota, the DataLoader workers and everything else running. Its OpenMP threads meet at a barrier after
# every op, so one thread that loses its core stalls them all: on a 2-core machine with other jobs, the toy CLIP
# trained 3.5-4.5x slower on 2 threads than on 1. The project sizes the pool itself, once per process.
# ---------------------------------------------------------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a container's --cpus)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def other_cpu_load(cpus: int) -> float:
    """CPUs kept busy by other work, estimated from the 1-minute load average (runnable tasks machine-wide),
    scaled to the share of the machine's CPUs this process may use. Read at start-up, it is mostly other jobs."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    return load * min(1.0, cpus / (os.cpu_count() or cpus))


def cpu_thread_count(requested: int | None = None, omp_num_threads: str | None = None, *, cpus: int,
                     workers: int = 0, local_world_size: int = 1, other_load: float = 0.0,
                     ceiling: int | None = None) -> tuple[int, str]:
    """(intra-op threads, why) for one process. Pure arithmetic; `configure_cpu_threads` supplies the inputs.

    Precedence: ``requested`` (the config's ``cpu_threads``), then ``omp_num_threads`` (the environment's
    OMP_NUM_THREADS, when a positive integer; note that torchrun sets 1 for several processes unless it is set),
    then the computed share: the ``cpus`` not busy with ``other_load``, divided among the ``local_world_size``
    processes of this machine, less this process's DataLoader ``workers`` (one thread each), rounded, at least 1
    and at most ``ceiling`` (torch's own default: the policy only ever lowers it).
    """
    if requested is not None:
        return requested, "cpu_threads in the config"
    if omp_num_threads is not None and omp_num_threads.strip().isdigit() and int(omp_num_threads) > 0:
        return int(omp_num_threads), f"OMP_NUM_THREADS={omp_num_threads.strip()}"
    share = (cpus - other_load) / max(1, local_world_size) - workers
    threads = max(1, math.floor(share + 0.5))
    if ceiling is not None:
        threads = min(threads, max(1, ceiling))
    return threads, (f"{cpus} usable CPU(s), ~{other_load:.1f} busy with other work (load average), "
                     f"{local_world_size} local process(es), {workers} DataLoader worker(s) each")


_cpu_snapshot: tuple[int, float, int] | None = None
_cpu_decision: tuple[int, str] | None = None


def configure_cpu_threads(config: dict) -> int:
    """Set torch's intra-op threads by `cpu_thread_count` and log the decision once; returns the count.

    Call where a run starts, before heavy work (entry points, before the toy models are built). Applies on a CPU
    run (``device`` cpu, or auto without CUDA); on CUDA only an explicit ``cpu_threads`` is applied. The machine
    (usable CPUs, load, torch's default) is read on the first call only, so every run in one process (tests,
    a pre-training recipe run inside a fine-tuning launch) gets the same count and the same numerics. The inter-op
    pool is left alone: the project runs no inter-op work, and it can be sized only before its first use.
    DataLoader workers need nothing: torch sets 1 thread in each (torch/utils/data/_utils/worker.py).
    """
    global _cpu_snapshot, _cpu_decision
    requested = config.get("cpu_threads")
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise ConfigError(f"cpu_threads must be a positive integer or null (automatic), got {requested!r}")
    device = str(config.get("device", "auto"))
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not on_cpu and requested is None:
        return torch.get_num_threads()
    if _cpu_snapshot is None:
        cpus = usable_cpus()
        _cpu_snapshot = (cpus, other_cpu_load(cpus), torch.get_num_threads())
    cpus, other_load, ceiling = _cpu_snapshot
    decision = cpu_thread_count(
        requested, os.environ.get("OMP_NUM_THREADS"), cpus=cpus, workers=config.get("data", {}).get("num_workers", 0),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), other_load=other_load, ceiling=ceiling)
    torch.set_num_threads(decision[0])
    if decision != _cpu_decision and os.environ.get("LOCAL_RANK", "0") == "0":
        logger.info("CPU threads: %d (%s; set cpu_threads or OMP_NUM_THREADS to choose)", *decision)
    _cpu_decision = decision
    return decision[0]
