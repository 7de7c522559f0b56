"""Device and thread selection from what the machine really offers (cgroups, affinity)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from segcli.errors import DeviceError


def available_cores() -> int:
    """Cores this process may use: CPU affinity, further capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        n = os.cpu_count() or 1
    for path in (Path("/sys/fs/cgroup/cpu.max"),):
        try:
            quota, period = path.read_text().split()[:2]
            if quota != "max":
                n = min(n, max(1, int(int(quota) / int(period))))
        except (OSError, ValueError):
            pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if q > 0 and p > 0:
            n = min(n, max(1, q // p))
    except (OSError, ValueError):
        pass
    return max(1, n)


def cuda_possible() -> bool:
    """False when this machine has no NVIDIA driver at all, decided without importing torch (1.4 s)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/dxg"))


def torch_cuda_available() -> bool:
    if not cuda_possible():
        return False
    # lazy: torch costs ~1.3 s to import
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str = "auto") -> str:
    """Map ``auto|cpu|cuda|cuda:N`` to a concrete torch device string, or raise DeviceError."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch_cuda_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch_cuda_available():
            raise DeviceError(f"--device {device} was asked for, but no CUDA device is usable on this machine")
        if ":" in device:
            # lazy: torch costs ~1.3 s to import
            import torch

            idx = device.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


_THREADS: list[int] = []  # the count set_threads chose, applied to torch when (and if) torch is loaded


def set_threads(threads: int | None = None) -> int:
    """Intra-op threads: ``threads`` or the cores really available; returns the count.

    torch gets it now if it is already loaded, else when a torch predictor is built (:func:`apply_threads`),
    so a run on ONNX Runtime never imports torch at all.
    """
    n = threads if threads and threads > 0 else available_cores()
    _THREADS[:] = [n]
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def chosen_threads() -> int:
    """The count of the last :func:`set_threads`, else the cores really available."""
    return _THREADS[0] if _THREADS else available_cores()


def apply_threads() -> None:
    """Give torch the chosen thread count (called as a torch predictor is built)."""
    # lazy: torch costs ~1.3 s to import
    import torch

    if _THREADS and torch.get_num_threads() != _THREADS[0]:
        torch.set_num_threads(_THREADS[0])
