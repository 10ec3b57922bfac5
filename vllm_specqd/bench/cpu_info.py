"""The CPU a result was measured on, named from /proc/cpuinfo (every table names it)."""

from __future__ import annotations

import platform
from pathlib import Path

# Cloud VMs often report just "AMD EPYC": name the core from family/model where known.
AMD_CORES = {(25, 1): "Zen 3 Milan", (25, 17): 'Zen 4 "Genoa"', (25, 160): "Zen 4c Bergamo", (26, None): "Zen 5"}
CPUINFO_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """(model name with family/model numbers, the SIMD flags that matter here).

    Example: ("AMD EPYC, CPU family 25 model 17 (Zen 4 "Genoa")", ["avx2", ..., "avx512_bf16"])."""
    name, family, model, flags = platform.processor() or platform.machine(), "", "", []
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value
            elif key == "cpu family" and not family:
                family = value
            elif key == "model" and not model:
                model = value
            elif key == "flags" and not flags:
                have = set(value.split())
                flags = [f for f in CPUINFO_FLAGS if f in have]
    except OSError:
        pass
    if family:
        core = AMD_CORES.get((int(family), int(model)), AMD_CORES.get((int(family), None), ""))
        name += f", CPU family {family} model {model}" + (f" ({core})" if core and "AMD" in name else "")
    return name, flags
