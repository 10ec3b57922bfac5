#!/usr/bin/env bash
# One short GPU session for the MXFP4 Triton kernels. The phases (CUDA tests, precompile, tune + twin
# check, kernel and decode-step timings, summary) are Python modules in benchmarks/gpu/, whose
# __init__.py lists the steps, output files and knobs; this driver keeps the budget, runs each phase
# under `timeout` and logs everything to $OUT/session.log. Needs python3 with torch, triton, pytest
# and numpy; no vLLM, nothing installed.
#     OUT=/some/dir bash benchmarks/gpu_session.sh                          # budget 420 s
#     OUT=/some/dir SPECQD_SESSION_SHORT=1 bash benchmarks/gpu_session.sh   # budget 280 s, ~3-4 min
#     OUT=/some/dir SPECQD_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh   # no GPU: plumbing only
# Sourced (tests/test_gpu_session.py), it only sets the settings and defines the budget functions.

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
mkdir -p "${OUT:=$REPO/gpu_session_out}" && OUT=$(cd "$OUT" && pwd)
SHORT=${SPECQD_SESSION_SHORT:-0}
SMOKE=${SPECQD_SESSION_SMOKE:-0}
export SPECQD_SESSION_SHORT=$SHORT SPECQD_SESSION_SMOKE=$SMOKE
BUDGET=${SPECQD_BUDGET_S:-$([[ $SHORT == 1 ]] && echo 280 || echo 420)}
RESERVE=25 # seconds kept for the summary
WORK=${SPECQD_WORK_DIR:-/tmp/specqd_gpu_session}
LOGS=$WORK/logs
NCPU=$(nproc 2>/dev/null || echo 4)
SHARDS=${SPECQD_TEST_SHARDS:-$((NCPU >= 8 ? 6 : (NCPU >= 4 ? 2 : 1)))}
WORKERS=${SPECQD_PRECOMPILE_WORKERS:-$((NCPU >= 14 ? 12 : (NCPU > 2 ? NCPU - 2 : 1)))}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Every python3 of the session imports kernels/ as vllm_specqd.kernels (benchmarks/gpu/site/sitecustomize.py).
export TRITON_CACHE_DIR=$WORK/triton_cache PYTHONPATH="$REPO:$REPO/benchmarks/gpu/site${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS

left() { echo $((BUDGET - (SECONDS - T0))); }

# step_timeout CAP: the timeout a step may use now (0 = skip it), keeping RESERVE for the summary.
step_timeout() {
    local l=$(($(left) - RESERVE))
    local t=$(($1 < l ? $1 : l))
    if ((t < 15)); then echo 0; else echo "$t"; fi
}

record() { # NAME RC SECONDS
    local flag=""
    if [[ $2 == 124 || $2 == 137 ]]; then flag="  TIMED OUT"; fi
    echo "=== [$1] rc=$2 in ${3}s (session at $((SECONDS - T0))s of ${BUDGET}s)$flag"
    printf '%-22s rc=%-4s %4ss%s\n' "$1" "$2" "$3" "$flag" >>"$LOGS/steps.txt"
}

# run_step NAME CAP CMD...: CMD under `timeout` (its limit also in SPECQD_STEP_TIMEOUT, for the
# phases that run children), or skipped when the budget is spent.
run_step() {
    local name=$1 cap=$2 t s
    shift 2
    t=$(step_timeout "$cap")
    if ((t == 0)); then
        echo "=== [$name] SKIPPED: $(left)s of budget left"
        printf '%-22s skipped (budget)\n' "$name" >>"$LOGS/steps.txt"
        return 0
    fi
    printf '\n=== [%s] start: timeout %ss, session at %ss: %s\n' "$name" "$t" $((SECONDS - T0)) "$*"
    s=$SECONDS
    SPECQD_STEP_TIMEOUT=$t timeout -k 10 "$t" "$@"
    record "$name" $? $((SECONDS - s))
}

session() {
    local gpu=benchmarks.gpu cuda interp=()
    echo "=== gpu_session.sh: $(date -u +%FT%TZ), repo $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "=== OUT=$OUT WORK=$WORK budget ${BUDGET}s, ${NCPU} CPUs, test shards $SHARDS, precompile workers $WORKERS, smoke $SMOKE, short $SHORT"
    printf '\n=== [info]\n'
    timeout -k 5 60 python3 -m "$gpu".env_check --host
    run_step info 60 python3 -m "$gpu".env_check
    cuda=$(timeout -k 5 60 python3 -m "$gpu".env_check --has-cuda 2>/dev/null || echo 0)
    if [[ $cuda != 1 && $SMOKE != 1 ]]; then
        echo "=== NO CUDA DEVICE: only the test step runs (CUDA tests skip); set SPECQD_SESSION_SMOKE=1 to smoke-test the rest"
    fi
    run_step tests 120 python3 -m "$gpu".correctness --shards "$SHARDS" --logs "$LOGS"
    if [[ $cuda == 1 || $SMOKE == 1 ]]; then
        if [[ $SMOKE == 1 ]]; then interp=(TRITON_INTERPRET=1); fi # kernels in the interpreter, on CPU
        run_step precompile 100 env ${interp[@]+"${interp[@]}"} TRITON_CACHE_AUTOTUNING=0 \
            python3 -m "$gpu".precompile --workers "$WORKERS" --logs "$LOGS"
        export TRITON_CACHE_AUTOTUNING=1 # tune+check stores its picks, the timings reuse them
        run_step tune+check 100 env ${interp[@]+"${interp[@]}"} python3 -m "$gpu".tune_check "$OUT/kernel_check.json"
        run_step bench_kernels 150 python3 -m "$gpu".timings kernels "$OUT/bench_kernels.json"
        run_step bench_decode_step 150 python3 -m "$gpu".timings decode_step "$OUT/bench_decode_step.json"
        if [[ ${SPECQD_SKIP_PREFILL:-0} != 1 && $SHORT != 1 ]]; then
            run_step prefill_dequant 45 env TRITON_CACHE_AUTOTUNING=0 \
                python3 -m "$gpu".timings prefill "$OUT/bench_kernels_prefill_dequant.json"
        fi
        unset TRITON_CACHE_AUTOTUNING
        if [[ ${SPECQD_RUN_INTERP:-0} == 1 ]]; then run_step interp_tests 150 python3 -m "$gpu".correctness --interp; fi
        echo
        RESERVE=0 # the summary may use what is left
    fi
    run_step summary "$([[ $RESERVE == 0 ]] && echo 30 || echo 60)" python3 -m "$gpu".summary "$OUT" "$WORK"
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then return 0; fi # sourced: settings and functions only
rm -rf "$LOGS"
mkdir -p "$LOGS" "$TRITON_CACHE_DIR"
session 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
