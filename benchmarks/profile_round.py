"""Where a specqd drafting round's time goes: every forward pass of every level, its rows, its cost.

Starts one offline engine (the bench's settings: ``vllm_specqd.bench.offline``), installs timers in
the worker through ``LLM.collective_rpc`` and runs greedy generation over HumanEval prompts. Per
round (one target step + one ``propose`` call) it records, in order:

* ``target``: the target's forward pass (rows = tokens fed: the verification window, or a prefill);
* ``L1 first``: level 1's first pass (one level, or a separate KV); ``L1 window``: its window passes
  in the chain;
* ``L<n> window``: an inner model's window passes (the first one of a round also catches its KV up);
* ``L<n> logits``: the lm_head + argmax of every pass (also inside the pass's own time);
* ``host``: ``propose`` time outside any forward pass (bookkeeping, n-gram lookups, tensors);
* ``engine``: the rest of the step (scheduler, sampler, the target's metadata), from wall time.

Decode rounds only (prefill steps are left out); ``--torch-profile N`` adds torch's operator table
over N decode rounds. Writes ``profile.md`` and ``profile.json`` into ``--out``.

    VLLM_ALLOW_INSECURE_SERIALIZATION=1 flock /tmp/specqd-engine.lock .venv/bin/python \
        benchmarks/profile_round.py --model qwen2.5-coder-1.5b --small-model qwen2.5-coder-0.5b \
        --method specqd-small --dtype bfloat16 --k 6 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def install(worker, torch_profile_rounds: int = 0, skip_rounds: int = 8):
    """In the worker: time every pass of the target and each level, tagged by what it is."""
    from torch.profiler import ProfilerActivity, profile, record_function

    runner = worker.model_runner
    drafter = runner.drafter
    st = worker._specqd_prof = {
        "events": [],
        "rounds": [],
        "phase": None,
        "table": None,
        "decode_rounds": 0,
        "kernels": {},
    }
    prof_state = {"prof": None, "left": 0}

    def timed(tag_fn, fn):
        def wrapper(*args, **kwargs):
            tag, rows = tag_fn(*args, **kwargs)
            start = time.perf_counter()
            with record_function(tag):
                out = fn(*args, **kwargs)
            st["events"].append((tag, rows, time.perf_counter() - start, start))
            return out

        return wrapper

    def rows_of(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        return None if ids is None else int(ids.shape[0])

    target = runner.model
    target.forward = timed(lambda *a, **k: ("target", rows_of(*a, **k)), target.forward)

    level1 = drafter.level1_model
    inner = list(drafter.inner_window_models)

    def model_tag(name):
        def tag(*a, **k):
            phase = st["phase"] or "pass"
            return f"{name} {phase}", rows_of(*a, **k)

        return tag

    level1.model.forward = timed(model_tag("L1"), level1.model.forward)
    for n, wm in enumerate(inner, start=2):
        wm.model.forward = timed(model_tag(f"L{n}"), wm.model.forward)
    for n, wm in enumerate([level1, *inner], start=1):
        model = wm.model
        model.compute_logits = timed(lambda h, _n=n: (f"L{_n} logits", int(h.shape[0])), model.compute_logits)
        from vllm_specqd.adapter.mxfp4_linear import MXFP4LinearMethod

        kinds = defaultdict(int)
        for m in model.modules():
            kernel = getattr(m, "specqd_kernel", None)
            if isinstance(getattr(m, "quant_method", None), MXFP4LinearMethod) or kernel is not None:
                kinds[getattr(kernel, "name", type(kernel).__name__ if kernel else "torch twin")] += 1
        head = getattr(model, "lm_head", None)
        st["kernels"][f"L{n}"] = {
            "linears": dict(kinds),
            "lm_head": type(head).__name__,
            "lm_head_kernel": getattr(getattr(head, "specqd_kernel", None), "name", None),
            "lm_head_dtype": str(getattr(getattr(head, "weight", None), "dtype", None)),
        }

    def set_phase(phase, fn):
        def wrapper(*args, **kwargs):
            before, st["phase"] = st["phase"], phase
            try:
                return fn(*args, **kwargs)
            finally:
                st["phase"] = before

        return wrapper

    level1.greedy_next_tokens = set_phase("window", level1.greedy_next_tokens)
    level1.decode_step = set_phase("first", level1.decode_step)
    for wm in inner:
        wm.greedy_next_tokens = set_phase("window", wm.greedy_next_tokens)
    from vllm_specqd.adapter import vllm_internals

    run_first = vllm_internals.run_first_pass

    def run_first_pass(*a, **k):
        before, st["phase"] = st["phase"], "first"
        try:
            return run_first(*a, **k)
        finally:
            st["phase"] = before

    vllm_internals.run_first_pass = run_first_pass

    propose = drafter.propose
    k_max = drafter.specqd.num_speculative_tokens

    def close_round():
        events = st["events"]
        st["events"] = []
        if st.get("round_start") is None:
            return
        targets = [e for e in events if e[0] == "target"]
        decode = len(targets) == 1 and targets[0][1] <= k_max + 1 and any(e[0] == "propose" for e in events)
        profiled = st.get("profiling", False)
        st["rounds"].append({"start": st["round_start"], "decode": decode, "events": events, "profiled": profiled})

    def execute_model(fn):
        def wrapper(*args, **kwargs):
            close_round()
            st["round_start"] = time.perf_counter()
            n = sum(r["decode"] for r in st["rounds"])
            if torch_profile_rounds and n == skip_rounds and prof_state["prof"] is None and st["table"] is None:
                prof_state["prof"] = profile(activities=[ProfilerActivity.CPU])
                prof_state["prof"].__enter__()
                prof_state["end_at"] = n + torch_profile_rounds
                st["profiling"] = True
            elif prof_state["prof"] is not None and n >= prof_state["end_at"]:
                prof_state["prof"].__exit__(None, None, None)
                st["table"] = prof_state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                prof_state["prof"] = None
                st["profiling"] = False
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            st["events"].append(("execute_model", None, time.perf_counter() - start, start))
            return out

        return wrapper

    runner.execute_model = execute_model(runner.execute_model)
    runner.sample_tokens = timed(lambda *a, **k: ("sample_tokens", None), runner.sample_tokens)
    target.compute_logits = timed(lambda h, *a, **k: ("target logits", int(h.shape[0])), target.compute_logits)
    drafter.propose = timed(lambda *a, **k: ("propose", None), propose)
    st["close_round"] = close_round
    return "ok"


def read(worker):
    st = worker._specqd_prof
    st["close_round"]()
    st["round_start"] = None
    return {"rounds": st["rounds"], "table": st["table"], "kernels": st["kernels"]}


def summarize(rounds: list[dict], skip: int) -> dict:
    """Mean per decode round of each pass kind (passes, rows, ms) and of the time around them.

    A round runs from one ``execute_model`` call to the next: the target's pass and logits, vLLM's
    sampling, ``propose`` (the levels' passes and logits, and host work between them), then the
    engine core's scheduling and the process hop back (``outside the runner``)."""
    starts = [r["start"] for r in rounds]
    decode = [(r, starts[i + 1] - r["start"]) for i, r in enumerate(rounds[:-1]) if r["decode"]][skip:]
    decode = [(r, step) for r, step in decode if not r["profiled"]]  # the torch profiler slows its rounds
    per_kind = defaultdict(lambda: {"passes": 0, "rows": 0, "seconds": 0.0, "row_hist": defaultdict(int)})
    other = defaultdict(float)
    for r, step in decode:
        total = defaultdict(float)
        for tag, rows, seconds, _ in r["events"]:
            total[tag] += seconds
            if tag in ("execute_model", "sample_tokens", "propose"):
                continue
            k = per_kind[tag]
            k["passes"] += 1
            k["rows"] += rows or 0
            k["seconds"] += seconds
            k["row_hist"][rows] += 1
        levels = sum(v for tag, v in total.items() if tag.startswith("L"))
        runner = total["execute_model"] + total["sample_tokens"]
        other["host in propose"] += total["propose"] - levels
        other["runner (inputs, sampler, bookkeeping)"] += (
            runner - total["target"] - total["target logits"] - total["propose"]
        )
        other["outside the runner (engine core, IPC)"] += step - runner
        other["step"] += step
    n = len(decode)
    kinds = {
        tag: {
            "passes_per_round": k["passes"] / n,
            "rows_per_pass": k["rows"] / k["passes"],
            "ms_per_pass": 1e3 * k["seconds"] / k["passes"],
            "ms_per_round": 1e3 * k["seconds"] / n,
            "rows": {str(rows): count for rows, count in sorted(k["row_hist"].items(), key=lambda x: x[0] or 0)},
        }
        for tag, k in per_kind.items()
    }
    return {"decode_rounds": n, "kinds": kinds, "other_ms_per_round": {k: 1e3 * v / n for k, v in other.items()}}


ORDER = ["target", "target logits", "L1 first", "L1 window", "L1 logits"]


def markdown(meta: dict, summary: dict, kernels: dict, table: str | None, tokens_per_round: float | None) -> str:
    lines = [f"# Round profile: {meta['method']}", "", *(f"* {k}: {v}" for k, v in meta.items()), ""]
    lines.append(f"* decode rounds profiled: {summary['decode_rounds']} (batch 1)")
    if tokens_per_round:
        lines.append(f"* tokens per round (generated / decode rounds): {tokens_per_round:.2f}")
    for level, info in kernels.items():
        lines.append(
            f"* {level} kernels: linears {info['linears']}, lm_head {info['lm_head']} "
            f"({info['lm_head_kernel'] or info['lm_head_dtype']})"
        )
    lines += [
        "",
        "| what | per round | rows per pass (histogram rows:passes) | ms per pass | ms per round | share of step |",
        "|---|---|---|---|---|---|",
    ]
    other = summary["other_ms_per_round"]
    step = other["step"]
    tags = sorted(summary["kinds"], key=lambda t: (ORDER.index(t) if t in ORDER else len(ORDER), t))
    for tag in tags:
        k = summary["kinds"][tag]
        hist = ", ".join(f"{rows}:{count}" for rows, count in k["rows"].items())
        lines.append(
            f"| {tag} | {k['passes_per_round']:.2f} | {k['rows_per_pass']:.1f} ({hist}) | {k['ms_per_pass']:.1f} | "
            f"{k['ms_per_round']:.1f} | {k['ms_per_round'] / step:.0%} |"
        )
    for name, ms in other.items():
        if name != "step":
            lines.append(f"| {name} | | | | {ms:.1f} | {ms / step:.0%} |")
    lines.append(f"| **step** (execute_model to execute_model) | | | | **{step:.1f}** | 100% |")
    lines += [
        "",
        "`L<n> logits`: compute_logits (the lm_head) after a pass, outside the pass's own forward time. "
        "`host in propose`: propose minus every level's passes and logits.",
    ]
    if table:
        lines += ["", "## torch profiler (CPU ops, decode rounds)", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--small-model", default=None)
    p.add_argument("--method", default="specqd-small", help="a bench method (vllm_specqd/bench/methods.py)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--inner-k", type=int, default=None)
    p.add_argument("--specqd-draft", type=json.loads, default=None)
    p.add_argument("--num-prompts", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--skip-rounds", type=int, default=4, help="decode rounds left out at the start (warm-up)")
    p.add_argument("--torch-profile", type=int, default=0, help="torch profiler table over this many decode rounds")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm_specqd.bench import datasets
    from vllm_specqd.bench.cli import _model_dir
    from vllm_specqd.bench.methods import method_named
    from vllm_specqd.bench.offline import RunSettings, _start_engine, set_engine_env_defaults

    set_engine_env_defaults(verbose=False)
    model, small = _model_dir(args.model, p), _model_dir(args.small_model, p)
    settings = RunSettings(
        model,
        small,
        args.dtype,
        args.k,
        args.max_tokens,
        1,
        2048,
        False,
        args.inner_k,
        args.specqd_draft,
        None,
        eager=args.eager,
    )
    method = method_named(args.method)
    from vllm_specqd.bench.methods import speculative_config_for

    spec = speculative_config_for(method, settings)
    prompts = datasets.load_prompts("humaneval", args.num_prompts, model)
    llm = _start_engine(settings, spec)
    from vllm import SamplingParams

    llm.generate([prompts[0].text], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    llm.collective_rpc(install, args=(args.torch_profile, args.skip_rounds))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    generated = 0
    for prompt in prompts:
        out = llm.generate([prompt.text], params, use_tqdm=False)
        generated += len(out[0].outputs[0].token_ids)
    wall = time.perf_counter() - start
    data = llm.collective_rpc(read)[0]
    summary = summarize(data["rounds"], args.skip_rounds)
    decode_rounds = sum(r["decode"] for r in data["rounds"]) + len(prompts)  # + each prompt's prefill round
    meta = {
        "method": args.method,
        "model": model,
        "small_model": small,
        "dtype": args.dtype,
        "k": args.k,
        "inner_k": args.inner_k,
        "speculative_config": json.dumps(spec),
        "engine_mode": "eager" if args.eager else "compiled (vLLM default)",
        "prompts": f"{len(prompts)} HumanEval x {args.max_tokens} tokens",
        "tok/s (profiled run, timers on)": f"{generated / wall:.2f}",
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(meta, summary, data["kernels"], data["table"], generated / max(1, decode_rounds))
    (out / "profile.md").write_text(md)
    (out / "profile.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "kernels": data["kernels"], "rounds": data["rounds"]})
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
