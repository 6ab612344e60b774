"""Peak memory, read in one place: process RSS high-water mark and torch's CUDA peak allocation."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_bytes() -> int:
    """The process' resident-set high-water mark (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def read(self) -> tuple[int, int]:
        """(peak RSS bytes, peak CUDA bytes allocated by torch; 0 on CPU)."""
        vram = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        return peak_rss_bytes(), vram


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"
