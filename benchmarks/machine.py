"""One line that says what a benchmark ran on: CPU model, usable cores, torch threads, load, GPU and versions.

Every benchmark prints it first, so a number is never read without its machine and conditions.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: torch.device | str | None = None, extras: tuple[str, ...] = ()) -> str:
    """E.g. ``NVIDIA H100 80GB HBM3; AMD EPYC 7R13; 16 usable cores (torch threads 16); load avg 0.5 / ...``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = f"{torch.cuda.get_device_name(device)}; " if device.type == "cuda" else ""
    parts = [f"{gpu}{cpu_model()}", f"{cores} usable cores (torch threads {torch.get_num_threads()})",
             f"load avg {load}", f"python {platform.python_version()}", f"torch {torch.__version__}", *extras]
    return "; ".join(parts)
