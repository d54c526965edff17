"""The machine a benchmark ran on, in one line: CPU model, cores, vector extensions.

Every printed figure names its CPU (speed differs between an AVX2-only and an AVX-512
machine), so each benchmark prints :func:`cpu_description` beside its numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The instruction-set flags that decide which kernels are fast.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "neon", "asimd")


def cpu_description() -> str:
    """``"AMD EPYC 9R14, 2 cores, avx2 fma avx512f avx512_bf16"`` (what /proc/cpuinfo says)."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    found = " ".join(f for f in VECTOR_FLAGS if f in flags) or "no vector flags found"
    return f"{name}, {os.cpu_count()} cores, {found}"
