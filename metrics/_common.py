"""Small helpers shared by the metrics: JSON input, device choice and batching."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch


class MetricInputError(ValueError):
    """A results file, ground truth or metric argument that cannot be scored; the message names the file or key.

    eval_caption.py prints these as one line (no traceback) and exits with status 2.
    """


class MetricInputNotFound(MetricInputError, FileNotFoundError):
    """A results, ground-truth or image file that does not exist (also a FileNotFoundError)."""


def read_json_file(path: str | Path, what: str):
    """Parse a JSON file; a missing file or bad JSON is an error naming ``what`` and the path."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise MetricInputNotFound(f"{what} not found: {path}") from None
    except json.JSONDecodeError as err:
        raise MetricInputError(f"{what} {path} is not valid JSON: {err}") from None


def load_from_source(loaders: dict, source: str, what: str, expected: str) -> dict:
    """Call each ``name -> from_pretrained`` loader on ``source``; a failure says what was tried and what to pass.

    Returns ``{name: loaded object}``. ``expected`` describes what a usable local directory holds.
    """
    try:
        return {name: loader(source) for name, loader in loaders.items()}
    except (OSError, ValueError) as err:
        where = "local directory" if Path(source).is_dir() else "hub id (and not an existing local directory)"
        raise OSError(
            f"could not load {what} from {source!r} ({where}): {err}. Pass a directory holding {expected}, "
            "or a hub id reachable from this machine."
        ) from err


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when available and CPU otherwise (the metrics' default)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most `batch_size` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists into ``(ids (B, T) long, mask (B, T) long)``.

    Right padding keeps every real token at positions 0..len-1, so causal models (GPT-2, CLIP's
    text tower) see exactly what they would see unpadded: padding only ever comes *after* the
    tokens it could otherwise influence.
    """
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(s, dtype=torch.long) for s in sequences], batch_first=True, padding_value=pad_id
    )
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids, mask


def hf_features(output) -> torch.Tensor:
    """The projected embedding from CLIPModel.get_{text,image}_features.

    transformers 4.x returns the tensor itself; 5.x returns a BaseModelOutputWithPooling whose
    ``pooler_output`` holds the projection. requirements.txt allows both.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output
