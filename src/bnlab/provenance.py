"""Where a number came from: machine, versions and code revision, for benchmark and experiment records."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

__all__ = ["cpu_model", "git_revision", "gpu_provenance", "machine_summary", "provenance"]


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    """The bnlab source tree's git revision (with '+dirty' for uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, object]:
    """A flat record of the machine and software, for CSV rows and run directories."""
    from bnlab import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "bnlab": __version__,
        "git": git_revision(),
    }


def machine_summary(record: dict[str, object] | None = None) -> str:
    """One line for humans: CPU (cores), GPU if any, torch version."""
    r = record or provenance()
    gpu = f", {r['gpu']}" if r.get("gpu") else ", no GPU"
    return f"{r['cpu']} ({r['cpu_count']} cores, {r['torch_threads']} torch threads){gpu}; torch {r['torch']}"


def gpu_provenance(device: torch.device | str | None = None) -> dict[str, object]:
    """The GPU and the software under a GPU timing (driver, CUDA, cuDNN, Triton): GPU numbers depend on all four.

    Every key is always present (empty where there is no CUDA device), so CSV columns do not depend on the
    machine. `device` picks the GPU (default: the current one).
    """
    record: dict[str, object] = {
        "gpu": "",
        "gpu_capability": "",
        "gpu_memory_gib": "",
        "gpu_driver": "",
        "cuda": torch.version.cuda or "",
        "cudnn": "",
        "triton": _triton_version(),
    }
    if not torch.cuda.is_available():
        return record
    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    record.update(
        gpu=props.name,
        gpu_capability=f"{props.major}.{props.minor}",
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        gpu_driver=_nvidia_driver(index),
        cudnn=str(torch.backends.cudnn.version() or ""),
    )
    return record


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return str(getattr(triton, "__version__", ""))


def _nvidia_driver(index: int) -> str:
    """The NVIDIA driver version from nvidia-smi (torch does not expose it), or 'unknown'."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
