"""DEVICES: what each role of an RL step used of the machine: its memory peak, GPU busy time, a named range.

    probe = RoleProbe(torch.device("cuda"))
    with probe.role("train"):      # resets the peak; on CUDA also an NVTX range "train" (Nsight)
        ...
    probe.metrics()                # {"mem/peak_train": MiB, ..., "gpu/util": %}; probe.clear() per step

The peak is measured where the role's tensors live:

    CUDA   torch.cuda.max_memory_allocated, reset (reset_peak_memory_stats) as each role starts: the most
           the caching allocator handed out to tensors during the role, in MiB. Memory reserved but free
           in the cache is not counted (torch.cuda.max_memory_reserved would be the OOM-relevant total).
    CPU    the process's peak resident set size (VmHWM in /proc/self/status), reset as each role starts by
           writing "5" to /proc/self/clear_refs (Linux: resets only the high-water mark). Where that
           cannot be done (not Linux, /proc read-only), getrusage's ru_maxrss is the only peak there is:
           a process-lifetime maximum that never goes down, so it is logged as mem/peak_so_far_<role>
           instead, never under the per-role name.

`gpu/util` is the mean of NVML's utilisation (percent of the last sample period in which a kernel ran),
read as each role ends; it needs pynvml (pip install nvidia-ml-py) and is left out without it. A role's
NVTX range costs about a microsecond and shows in an `nsys profile` timeline under the role's name.
"""

from __future__ import annotations

import re
import resource
import sys
from contextlib import contextmanager

import torch

MiB = 2 ** 20
_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)


def rss_peak_mib() -> float | None:
    """The process's peak resident set size since the last reset (VmHWM), in MiB; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            m = _HWM.search(f.read())
    except OSError:
        return None
    return int(m.group(1)) * 1024 / MiB if m else None


def reset_rss_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux's clear_refs "5"); False where that fails."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return rss_peak_mib() is not None


def lifetime_rss_peak_mib() -> float:
    """getrusage's maximum RSS of the whole process so far, in MiB (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MiB if sys.platform == "darwin" else peak * 1024 / MiB


class RoleProbe:
    """Per-role memory peaks (and on CUDA, GPU utilisation samples and NVTX ranges) of one device.

    A role entered several times in a step (refill rounds, the reference's two passes) keeps its largest
    peak. Not thread-safe: the peak is process-wide (CPU) or device-wide (CUDA), so only one thread's
    roles may be probed; the async controller probes only its own thread's roles."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        # on CPU: can the peak be reset per role? decided once (the answer does not change within a process)
        self.resettable = self.cuda or reset_rss_peak()
        self.prefix = "mem/peak_" if self.resettable else "mem/peak_so_far_"
        self.use_nvml = self.cuda  # set to False at the first failure (pynvml missing, no NVML driver)
        self.peaks: dict[str, float] = {}
        self.util: list[float] = []

    def clear(self) -> None:
        """Forget the peaks and samples (at the start of each step)."""
        self.peaks, self.util = {}, []

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            reset_rss_peak()

    def _peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / MiB
        if self.resettable:
            peak = rss_peak_mib()
            if peak is not None:
                return peak
        return lifetime_rss_peak_mib()

    def _sample_util(self) -> None:
        if not self.use_nvml:
            return
        try:
            self.util.append(float(torch.cuda.utilization(self.device)))
        except Exception:  # pynvml not installed, or no NVML (some containers): no gpu/util, the step goes on
            self.use_nvml = False

    @contextmanager
    def role(self, name: str):
        """Measure the block as role `name`: reset the peak, run it (inside an NVTX range on CUDA), keep the peak.

        No device synchronisation: the caching allocator counts a tensor when it is allocated on the host,
        in stream order, so the peak is exact without waiting for kernels (and an async rollout thread's
        kernels are not waited for)."""
        self._reset()
        if self.cuda:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.nvtx.range_pop()
            self.peaks[name] = max(self.peaks.get(name, 0.0), self._peak())
            self._sample_util()

    def metrics(self) -> dict[str, float]:
        """This step's `mem/peak_<role>` (or `mem/peak_so_far_<role>`) in MiB, and `gpu/util` when sampled."""
        out = {f"{self.prefix}{role}": peak for role, peak in self.peaks.items()}
        if self.util:
            out["gpu/util"] = sum(self.util) / len(self.util)
        return out
