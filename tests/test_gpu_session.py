"""The GPU session (benchmarks/gpu_session.sh + benchmarks/gpu/) on the CPU: driver, budget, parsing, reports.

Where a format is checked, the expected text is what the session printed and wrote on the H200
(benchmarks/results/2026-12-04-h200/) or real Triton output (a decode kernel's SASS for sm_90).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import site
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu import (  # noqa: E402
    autotune_plugin,
    correctness,
    env_check,
    kernel_stats,
    layout,
    parallel,
    precompile,
    summary,
    timings,
    tune_check,
)
from benchmarks.gpu.shapes import Shapes, session_shapes  # noqa: E402

DRIVER = REPO / "benchmarks" / "gpu_session.sh"
H200 = REPO / "benchmarks" / "results" / "2026-12-04-h200"
PHASES = [
    "env_check",
    "correctness",
    "autotune_plugin",
    "precompile",
    "tune_check",
    "kernel_stats",
    "timings",
    "summary",
    "shapes",
    "parallel",
    "layout",
]


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not _has_triton(), reason="needs the [triton] extra")


def _session_log() -> str:
    return (H200 / "session.log").read_text()


# ----------------------------------------------------------------------------- driver and budget
def test_driver_is_short_valid_bash_without_heredocs():
    assert subprocess.run(["bash", "-n", str(DRIVER)], capture_output=True).returncode == 0
    assert len(DRIVER.read_text().splitlines()) <= 100
    for script in (REPO / "benchmarks").rglob("*.sh"):
        assert "<<" not in script.read_text(), f"{script}: heredoc"


def _source_driver(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """Source the driver (settings and functions only) in bash and run ``script`` after it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPECQD_")}
    base.update(OUT=str(tmp_path / "out"), SPECQD_WORK_DIR=str(tmp_path / "work"), **env)
    cmd = f'source "{DRIVER}" && mkdir -p "$LOGS" && {script}'
    return subprocess.run(["bash", "-c", cmd], env=base, capture_output=True, text=True, timeout=60)


def test_sourcing_the_driver_runs_no_session_and_budgets_follow_the_mode(tmp_path):
    full = _source_driver(tmp_path, "echo $BUDGET")
    assert full.returncode == 0, full.stderr
    assert full.stdout.split() == ["420"]
    assert not (tmp_path / "out" / "session.log").exists()
    assert _source_driver(tmp_path, "echo $BUDGET", SPECQD_SESSION_SHORT="1").stdout.split() == ["280"]
    assert _source_driver(tmp_path, "echo $BUDGET", SPECQD_BUDGET_S="99").stdout.split() == ["99"]


@pytest.mark.parametrize(
    "budget, cap, expected",
    [
        (100, 120, 75),  # capped by the budget, 25 s kept for the summary
        (100, 60, 60),  # capped by the step's own limit
        (40, 60, 15),  # 15 s is the shortest step worth starting
        (39, 60, 0),  # ... below it the step is skipped
    ],
)
def test_step_timeout_keeps_the_reserve(tmp_path, budget, cap, expected):
    r = _source_driver(tmp_path, f"left() {{ echo {budget}; }}; step_timeout {cap}")  # {budget} s left
    assert r.stdout.split() == [str(expected)]


def test_left_counts_from_the_session_start(tmp_path):
    r = _source_driver(tmp_path, "BUDGET=100; T0=$((SECONDS - 30)); left")
    assert r.stdout.split() in (["70"], ["69"])  # 69 if a second ticked between the two lines


def test_run_step_passes_its_limit_records_rc_and_skips_when_spent(tmp_path):
    script = (
        "run_step fails 60 bash -c 'echo limit=$SPECQD_STEP_TIMEOUT; exit 3'; "
        "run_step stuck 60 bash -c 'exit 124'; "
        "BUDGET=20; run_step late 60 echo never; "
        'cat "$LOGS/steps.txt"'
    )
    r = _source_driver(tmp_path, script)
    assert r.returncode == 0, r.stderr
    assert "limit=60" in r.stdout
    assert "never" not in r.stdout
    assert "=== [late] SKIPPED" in r.stdout
    steps = [s for s in r.stdout.splitlines() if not s.startswith(("=", "limit")) and s.strip()]
    assert len(steps) == 3
    assert re.fullmatch(r"fails {18}rc=3 {7}[01]s", steps[0])  # 1 s if the clock ticked meanwhile
    assert re.fullmatch(r"stuck {18}rc=124 {5}[01]s  TIMED OUT", steps[1])
    assert steps[2] == "late                   skipped (budget)"


def test_record_writes_the_steps_lines_of_the_h200_summary(tmp_path):
    r = _source_driver(tmp_path, 'record info 0 13; record tune+check 1 28; cat "$LOGS/steps.txt"')
    written = r.stdout.splitlines()[-2:]
    real = (H200 / "summary.txt").read_text().splitlines()
    assert "  " + written[0] in real and "  " + written[1] in real


# ----------------------------------------------------------------------------- layout (no install)
def test_package_dirs_are_pyprojects():
    dirs = layout.package_dirs()
    assert dirs["vllm_specqd.kernels"] == REPO / "kernels"
    assert dirs["vllm_specqd"] == REPO / "vllm_specqd"


def test_finder_serves_a_package_dir_table(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = {"gs_demo_pkg" = "src", "gs_demo_pkg.sub" = "elsewhere"}\n'
    )
    for folder, text in (("src", "WHERE = 'src'\n"), ("elsewhere", "WHERE = 'elsewhere'\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text(text)
    finder = layout.PackageDirFinder(layout.package_dirs(tmp_path / "pyproject.toml"))
    assert finder.find_spec("gs_demo_pkg.other") is None
    sys.meta_path.append(finder)
    try:
        import gs_demo_pkg.sub

        assert gs_demo_pkg.sub.WHERE == "elsewhere"
        assert Path(gs_demo_pkg.__file__).parent == tmp_path / "src"
    finally:
        sys.meta_path.remove(finder)
        for name in ("gs_demo_pkg.sub", "gs_demo_pkg"):
            sys.modules.pop(name, None)


def test_install_appends_once_or_goes_first(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [m for m in sys.meta_path if not isinstance(m, layout.PackageDirFinder)])
    finder = layout.install()
    assert sys.meta_path[-1] is finder and layout.install() is finder
    assert layout.install(first=True) is finder
    assert sys.meta_path[0] is finder and sum(m is finder for m in sys.meta_path) == 1


def _bare_python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -S``: this environment's packages on PYTHONPATH, but no .pth files, so no editable
    install of vllm_specqd; the checkout is on the path, as on the lent GPU machine. No CUDA."""
    paths = [str(REPO), *site.getsitepackages()]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SPECQD_", "TRITON_", "PYTHON"))}
    base.update(PYTHONPATH=os.pathsep.join(paths), CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(code)],
        env=base,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_kernels_import_from_the_checkout_only_through_benchmarks_gpu(tmp_path):
    without = _bare_python("import vllm_specqd.kernels", tmp_path)
    assert "ModuleNotFoundError: No module named 'vllm_specqd.kernels'" in without.stderr
    r = _bare_python("import benchmarks.gpu, vllm_specqd.kernels as K; print(K.__file__)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == REPO / "kernels" / "__init__.py"


def test_session_pythonpath_serves_the_kernels_to_every_process(tmp_path):
    """A venv that sees this environment's packages but has no vllm_specqd installed, as on the GPU
    machine: with the driver's PYTHONPATH any python process imports the kernels (sitecustomize), and
    the sitecustomize it shadows still runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(purelib) / "main_env.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("print('shadowed sitecustomize ran')\n")
    code = "import vllm_specqd.kernels as K; print(K.__file__)"

    def run(*paths: Path) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECQD_", "TRITON_", "PYTHON"))}
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
        return subprocess.run([python, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    without = run(REPO, other)
    assert "No module named 'vllm_specqd.kernels'" in without.stderr
    # Another copy of the package ahead on the path: the session still imports this checkout.
    stale = tmp_path / "stale"
    for pkg in ("vllm_specqd", "vllm_specqd/kernels"):
        (stale / pkg).mkdir(parents=True)
        (stale / pkg / "__init__.py").write_text("")
    r = run(stale, REPO, REPO / "benchmarks" / "gpu" / "site", other)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["shadowed sitecustomize ran", str(REPO / "kernels" / "__init__.py")]


def test_every_phase_imports_without_cuda_or_an_install(tmp_path):
    code = f"""
        import importlib
        for name in {PHASES!r}:
            importlib.import_module("benchmarks.gpu." + name)
        from benchmarks.gpu import env_check, shapes
        env_check.main(["--has-cuda"])
        print(len(shapes.session_shapes(smoke=False, short=True).decode_jobs()))
    """
    r = _bare_python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "24"]  # no CUDA; 8 layers x M in {1, 4, 16}


# ----------------------------------------------------------------------------- shapes
def test_shapes_per_mode():
    full, short, smoke = session_shapes(False, False), session_shapes(False, True), session_shapes(True, True)
    assert full.decode_m == (1, 2, 4, 8, 16) and full.prefill_m == (64, 256, 1024, 4096)
    assert short.decode_m == (1, 4, 16) and short.prefill_m == (64, 256)
    assert len(full.decode_jobs()) == 40 and len(full.prefill_jobs()) == 16
    assert full.decode_jobs()[0] == ("8b", "qkv", 6144, 4096, 1)
    assert full.prefill_jobs()[-1] == ("8b", "down", 4096, 14336, 4096)
    assert smoke.decode_jobs()[-1] == ("70b", "o", 32, 64, 2)


# ----------------------------------------------------------------------------- env check
def test_host_report_says_when_nvidia_smi_fails():
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        return (127, "nvidia-smi: not found\n") if "-L" in cmd else (0, "name, driver_version\nH200, 580\n")

    lines = env_check.host_report(fake_run).splitlines()
    assert lines[:4] == ["nvidia-smi: not found", "(nvidia-smi failed)", "name, driver_version", "H200, 580"]
    assert lines[4].startswith("C compiler (Triton builds its launcher with it): ")
    assert lines[5].startswith("Python.h: ")
    assert calls[1][1].startswith("--query-gpu=name,driver_version,memory.total")


@needs_triton
def test_triton_smoke_kernel_runs_in_the_interpreter(tmp_path):
    r = _bare_python(
        "from benchmarks.gpu.triton_smoke import add_matches_torch; print(add_matches_torch('cpu'))",
        tmp_path,
        TRITON_INTERPRET="1",
    )
    assert r.stdout.split() == ["True"], r.stderr


# ----------------------------------------------------------------------------- tests step
def test_shards_are_round_robin_without_empty_ones():
    assert correctness.shard(list("abcdefg"), 3) == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert correctness.shard(list("ab"), 6) == [["a"], ["b"]]
    assert correctness.shard([], 2) == []


def test_collection_finds_the_session_tests(tmp_path):
    r = subprocess.run(
        correctness.pytest_cmd("--collect-only", correctness.TEST_FILE, "-k", correctness.SELECTION),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = correctness.collected_ids(r.stdout)
    assert len(ids) >= 10, r.stdout + r.stderr
    assert all(i.startswith("tests/test_kernels.py::test_") for i in ids)
    assert "tests/test_kernels.py::test_split_k_heuristic_fills_an_h100" in ids
    assert any("cuda" in i for i in ids)
    interp = subprocess.run(
        [sys.executable, "-m", "pytest", *correctness.INTERP_ARGS, "--collect-only", correctness.TEST_FILE]
        + ["-k", correctness.INTERP_SELECTION],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert any("interpreter_matches_twin" in i for i in correctness.collected_ids(interp.stdout)), interp.stdout


def test_plugin_lines_match_the_h200_log():
    log = _session_log().split("----- tests_shard_00.log\n")[1]
    real = [s for s in log.splitlines() if s.startswith("[specqd] _gemv_launch") or s.startswith("[specqd]     {")]
    real = real[: 1 + int(re.search(r"(\d+) of 12 configs", real[0]).group(1))]
    picked = [(4, 4, 4), (16, 4, 2), (4, 8, 2), (4, 8, 4), (8, 4, 4), (8, 8, 2), (4, 4, 4), (16, 4, 2), (8, 8, 2)]
    cfg = [SimpleNamespace(kwargs={"BLOCK_KB": kb}, num_warps=w, num_stages=s) for kb, w, s in picked]
    tuner = SimpleNamespace(cache={i: c for i, c in enumerate(cfg)}, configs=[None] * 12)
    assert autotune_plugin.exercised_lines("_gemv_launch", tuner) == real


def test_replace_do_bench_shadows_the_tuners_timer():
    tuner = SimpleNamespace()
    autotune_plugin.replace_do_bench(tuner, autotune_plugin._random_bench)
    assert tuner.do_bench is autotune_plugin._random_bench
    assert len(tuner._do_bench(None, quantiles=[0.5, 0.2, 0.8])) == 3


# ----------------------------------------------------------------------------- parallel children
def test_run_all_reports_exit_codes_timeouts_and_signals(tmp_path):
    cmds = [
        ["bash", "-c", "echo three; exit 3"],
        ["sleep", "60"],
        ["bash", "-c", "trap '' TERM; exec sleep 60"],  # ignores SIGTERM
        ["bash", "-c", "kill -SEGV $$"],
    ]
    logs = [tmp_path / f"log{i}" for i in range(len(cmds))]
    rcs = parallel.run_all(cmds, logs, seconds=1.5, grace=0.5)
    assert rcs == [3, 124, 137, 128 + signal.SIGSEGV]
    assert logs[0].read_text() == "three\n"
    assert parallel.last_failure(rcs) == 139
    assert parallel.last_failure([0, 0], 2) == 2  # a collection failure survives passing shards
    assert parallel.last_failure([0, 1, 0]) == 1
    assert parallel.child_seconds(120) == 108 and parallel.child_seconds(5) == 1


# ----------------------------------------------------------------------------- precompile
def test_precompile_pairs_follow_the_pruner_and_split_over_workers():
    configs = [SimpleNamespace(kwargs={"BLOCK_KB": kb}, num_warps=w) for w in (1, 2, 4) for kb in (4, 8)]
    mt = SimpleNamespace(
        _gemv_launch=SimpleNamespace(configs=configs),
        gemv_block_n=lambda m: 32 if m <= 4 else 64 if m <= 8 else 128,
        _prune_gemv=lambda cs, named, BLOCK_N: [c for c in cs if c.num_warps == BLOCK_N // 32],
    )
    calls = [(1, 64, 64, None), (8, 64, 64, None), (16, 64, 64, None)]
    pairs = precompile.gemv_pairs(mt, calls)
    assert pairs == [(0, calls[0]), (1, calls[0]), (2, calls[1]), (3, calls[1]), (4, calls[2]), (5, calls[2])]
    shares = [precompile.worker_share(pairs, i, 4, ["dequant"]) for i in range(4)]
    assert shares[0] == [pairs[0], pairs[4], "dequant"] and shares[3] == [pairs[3]]
    assert sorted(p for s in shares for p in s if p != "dequant") == sorted(pairs)
    interp = SimpleNamespace(_gemv_launch=object())  # the interpreter's launcher: one config, no tuner
    assert precompile.gemv_pairs(interp, calls[:1]) == [(None, calls[0])]


# ----------------------------------------------------------------------------- tune + check
def test_check_table_and_description_match_the_h200_run():
    log = _session_log().splitlines()
    chk = json.loads((H200 / "kernel_check.json").read_text())
    assert tune_check.what("1") == chk["what"]
    start = log.index(tune_check.HEADER)
    assert [tune_check.table_line(r) for r in chk["rows"]] == log[start + 1 : start + 1 + len(chk["rows"])]
    failed = {"model": "8b", "layer": "o", "N": 64, "K": 64, "M": 1, "forced_path": None, "ok": False, "error": "E: x"}
    assert tune_check.table_line(failed).endswith("  NO          nan         nan    E: x")


# Real Triton 3.9 get_sass output (cuobjdump -sass, sm_90) of _mxfp4_gemv_kernel, excerpts.
SASS = (
    "Function:_mxfp4_gemv_kernel\n"
    "--:-:-:-:1\tLDC R1, c[0x0][0x28];\n"
    "--:-:-:Y:7\tULDC UR13, c[0x0][0x10];\n"
    "--:-:1:-:1\tLDC R3, c[0x0][0x10];\n"
    "--:-:-:-:2\t@!UP1 UIADD3 UR10, UR10, -UR16, URZ;\n"
    "--:-:-:-:2\t@!UP1 UIADD3 UR9, UR9, 0x1, URZ;\n"
    "--:-:-:-:2\tUISETP.GE.U32.AND UP2, UPT, UR10, UR16, UPT;\n"
    "--:-:-:-:9\t@P5 BRA LBB0;\n"
    "--:1:-:-:1\tLDGSTS.E [R76], desc[UR12][R12.64], P2;\n"
    "--:-:-:Y:7\tLOP3.LUT R67, R68, 0x10, RZ, 0x3c, !PT;\n"
    "LBB1:\n"
    "--:-:-:-:1\tVIADD R10, R72, UR9;\n"
    "--:-:-:Y:4\tDEPBAR.LE SB0, 0x0;\n"
    "--:2:3:-:1\t@P6 LDG.E.U8 R9, desc[UR12][R12.64];\n"
    "--:-:-:Y:0\tNOP;\n"
    "--:-:-:Y:0\tNOP;\n"
    "\n"
)
# Its ASTSource.constants for BLOCK_M 1, BLOCK_N 32, BLOCK_KB 8 (keys: argument index), and arg_names.
GEMV_CONSTANTS = {(14,): False, (15,): True, (16,): 6, (17,): True, (18,): "bf16", (19,): 1, (20,): 32, (21,): 8}
GEMV_ARGS = (
    "x_ptr wq_ptr ws_ptr bias_ptr out_ptr part_ptr M N K KB stride_xm stride_wn stride_sn stride_om "
    "HAS_BIAS WRITE_PARTIAL LANE_SHIFT BF16_MATH DOT_DTYPE BLOCK_M BLOCK_N BLOCK_KB"
).split()


def test_sass_opcodes_count_instructions_not_labels_or_predicates():
    assert kernel_stats.sass_opcodes(SASS) == {
        "LDC": 2,
        "ULDC": 1,
        "UIADD3": 2,
        "UISETP.GE.U32.AND": 1,
        "BRA": 1,
        "LDGSTS.E": 1,
        "LOP3.LUT": 1,
        "VIADD": 1,
        "DEPBAR.LE": 1,
        "LDG.E.U8": 1,
        "NOP": 2,
    }


def test_block_constants_name_the_kernels_constexprs():
    assert kernel_stats.block_constants(GEMV_CONSTANTS, GEMV_ARGS) == {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_KB": 8}
    assert kernel_stats.block_constants({("BLOCK_X",): 3, (99,): 1}, GEMV_ARGS) == {}
    assert kernel_stats.block_constants(None, GEMV_ARGS) == {}


def _compiled(sass, regs=128):
    md = SimpleNamespace(shared=4608, num_warps=1, num_stages=3)
    return SimpleNamespace(
        metadata=md, src=SimpleNamespace(constants=GEMV_CONSTANTS), asm=sass, n_regs=regs, n_spills=0
    )


def test_compiled_kernel_stats_rows_and_two_histograms():
    class NoSass(dict):
        def __getitem__(self, key):
            raise RuntimeError("cuobjdump failed")

    kernels = {"a": _compiled({"sass": SASS}), "b": _compiled(NoSass(), 96), "c": _compiled({"sass": SASS})}
    fn = SimpleNamespace(device_caches={0: (kernels, None)}, arg_names=GEMV_ARGS)
    stats, hists = kernel_stats.compiled_kernel_stats(fn, with_sass=True)
    consts = "{'BLOCK_M': 1, 'BLOCK_N': 32, 'BLOCK_KB': 8}"
    assert stats[0] == dict(n_regs=128, n_spills=0, shared=4608, warps=1, stages=3, consts=consts)
    assert [s["n_regs"] for s in stats] == [128, 96, 128]
    assert list(hists) == [f"kernel0 regs128 {consts}", "kernel1"]
    assert hists[f"kernel0 regs128 {consts}"]["LDC"] == 2
    assert hists["kernel1"] == "no SASS: RuntimeError: cuobjdump failed"
    assert kernel_stats.compiled_kernel_stats(fn, with_sass=False)[1] == {}
    stats, hists = kernel_stats.compiled_kernel_stats(SimpleNamespace(arg_names=[]), with_sass=True)
    assert stats == [{"error": "AttributeError: 'types.SimpleNamespace' object has no attribute 'device_caches'"}]


@needs_triton
def test_sass_of_a_kernel_compiled_for_sm90():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.gpu.triton_smoke import _add

    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    src = ASTSource(fn=_add, signature=sig, constexprs={(4,): 256})
    try:
        kern = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        kern.asm["sass"]
    except Exception as e:  # a Triton without its CUDA tools (ptxas, cuobjdump)
        pytest.skip(f"cannot compile for sm_90 here: {e!r}")
    fn = SimpleNamespace(device_caches={0: ({"k": kern},)}, arg_names=_add.arg_names)
    stats, hists = kernel_stats.compiled_kernel_stats(fn, with_sass=True)
    assert stats[0]["consts"] == "{'BLOCK': 256}" and stats[0]["warps"] == 4
    (ops,) = hists.values()
    assert ops["EXIT"] >= 1 and ops["FADD"] >= 1
    assert any(op.startswith("LDG.E") for op in ops) and any(op.startswith("STG.E") for op in ops)


@needs_triton
def test_precompile_and_tune_check_run_in_the_interpreter(tmp_path):
    """The smoke session's phases 3 and 4: tiny shapes, kernels in the Triton interpreter on CPU."""
    env = dict(SPECQD_SESSION_SMOKE="1", TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    code = f"""
        import sys
        from benchmarks.gpu import precompile, tune_check
        print("rc", precompile.main(["--workers", "2", "--logs", {str(tmp_path)!r}, "--timeout", "200"]))
        print("rc", tune_check.main([{str(tmp_path / "check.json")!r}]))
    """
    r = _bare_python(code, tmp_path, TRITON_CACHE_AUTOTUNING="0", **env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [s for s in lines if s.startswith("rc")] == ["rc 0", "rc 0"], r.stdout
    assert re.match(r"\[precompile 0/2\] 5 of 5 \(config, call\) pairs ok", lines[0]), r.stdout
    chk = json.loads((tmp_path / "check.json").read_text())
    assert chk["all_ok"] and len(chk["rows"]) == 14
    assert [r["path"] for r in chk["rows"]] == ["gemv"] * 8 + ["dequant"] * 6
    assert "device_caches" in chk["gemv_kernels"][0]["error"]  # the interpreter compiles nothing


# ----------------------------------------------------------------------------- timings
def test_bench_command_lines_match_the_h200_run():
    full = session_shapes(False, False)
    for step, name in (("kernels", "bench_kernels"), ("decode_step", "bench_decode_step")):
        command = json.loads((H200 / f"{name}.json").read_text())["command"]
        argv = timings.bench_argv(step, f"/root/out/{name}.json", full, short=False)
        assert command == f"python benchmarks/{name}.py " + " ".join(argv)
    prefill = json.loads((H200 / "bench_kernels_prefill_dequant.json").read_text())["command"]
    argv = timings.bench_argv("prefill", "/root/out/bench_kernels_prefill_dequant.json", full, short=False)
    assert prefill.split() == ["python", "benchmarks/bench_kernels.py", *argv]


def test_short_session_timings():
    short = session_shapes(False, True)
    assert timings.bench_argv("kernels", "o.json", short, short=True) == (
        "--models 8b,70b --m 1,4,16 --iters 10 --out o.json".split()
    )
    assert timings.bench_argv("decode_step", "d.json", short, short=True) == (
        "--batch 1,4,16 --iters 20 --out d.json".split()
    )
    with pytest.raises(ValueError, match="unknown step"):
        timings.bench_argv("prefil", "x", short)


def test_timings_run_the_scripts_entry_points(tmp_path, monkeypatch):
    calls = []

    class Script:
        def main(self, argv):
            calls.append(("main", argv))
            return 1

        def run(self, args):
            calls.append(("run", vars(args)))
            return {"results": []}

    monkeypatch.setattr(timings, "repo_module", lambda folder, name: Script())
    monkeypatch.setattr(timings, "session_shapes", lambda smoke: Shapes({}, (1, 2), (17, 33)))
    out = str(tmp_path / "k.json")
    assert timings.run("decode_step", out, smoke=False) == 1
    assert timings.run("decode_step", out, smoke=True) == 1
    assert timings.run("prefill", out, smoke=True) == 0
    assert json.loads(Path(out).read_text()) == {"results": [], "command": "smoke"}
    assert calls[0] == ("main", timings.bench_argv("decode_step", out, Shapes({}, (1, 2), (17, 33))))
    assert calls[1] == ("main", ["--cpu-smoke", "--out", out])
    assert calls[2][1] == dict(models="8b", layers="o", m="17", iters=2, cpu=False, force_path="dequant", split_k=None)
    assert vars(timings.smoke_kernels_args("kernels", Shapes({}, (1, 2), (17,)))) == vars(
        argparse.Namespace(models="8b", layers="o", m="1,2", iters=2, cpu=False, force_path=None, split_k=None)
    )


# ----------------------------------------------------------------------------- summary
def _h200_logs() -> tuple[str, dict[str, str]]:
    """steps.txt and the shard logs of the H200 session, as its session.log and summary.txt hold them."""
    shards = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^----- (tests_shard_\d+\.log)\n(.*?)(?=^----- |^=== )", _session_log(), re.S | re.M)
    }
    real = (H200 / "summary.txt").read_text()
    steps = real.split("steps (rc 124/137 = timed out):\n")[1].split("\n\n")[0]
    return "".join(s[2:] + "\n" for s in steps.splitlines()), shards


def test_summary_of_the_h200_session():
    steps, shards = _h200_logs()
    assert len(shards) == 6
    mine = summary.summarize(H200, steps, shards).splitlines()
    real = (H200 / "summary.txt").read_text().splitlines()
    # Up to the prefill table the same text, plus the flatness line added after that run.
    flat = (
        "  flatness time(M=max)/time(M=1): 8b qkv 3.07, 8b o 1.37, 8b gate_up 8.62, 8b down 1.87, "
        "70b qkv 6.19, 70b o 4.17, 70b gate_up 9.32, 70b down 8.60"
    )
    cut_mine = next(i for i, s in enumerate(mine) if s.startswith("prefill"))
    cut_real = next(i for i, s in enumerate(real) if s.startswith("prefill"))
    assert flat in mine
    assert [s for s in mine[:cut_mine] if s != flat] == real[:cut_real]
    # The prefill table: the dequant times the H200 summary printed, without the tiled kernel; bf16 is
    # now the dequant run's own cuBLAS time (the H200 summary showed the tiled run's).
    dequant = {}
    for s in real[cut_real + 1 :]:
        layer, m, t = re.match(r"\s*(\w+) M=\s*(\d+): tiled .* dequant\s+(\S+)\s+bf16", s).groups()
        dequant[(layer, int(m))] = t
    rows = json.loads((H200 / "bench_kernels_prefill_dequant.json").read_text())["results"]
    bf16 = {(r["layer"], r["M"]): f"{r['bf16_time_us']:.1f}" for r in rows}
    got = {}
    for s in mine[cut_mine + 1 :]:
        layer, m, t, b, x = re.match(r"\s*(\w+) M=\s*(\d+): dequant\s+(\S+)\s+bf16\s+(\S+)\s+-> (\S+)x", s).groups()
        got[(layer, int(m))] = t
        assert b == bf16[(layer, int(m))]
        assert abs(float(x) - float(b) / float(t)) < 0.01
    assert got == dequant and len(got) == 16


def test_summary_without_results_names_what_is_missing(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "tests_shard_00.log").write_text("....\nTraceback: killed\n")
    assert summary.main([str(tmp_path), str(tmp_path)]) == 0
    text = (tmp_path / "summary.txt").read_text()
    assert "  (no steps.txt)" in text
    assert "  tests_shard_00.log: NO RESULT LINE (timeout or crash?)" in text
    for name in ("kernel_check.json", "bench_kernels.json", "bench_decode_step.json"):
        assert f"  ({name}: FileNotFoundError)" in text
    assert "prefill" not in text
