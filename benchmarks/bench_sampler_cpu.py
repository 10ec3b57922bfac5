"""What sampling costs in an adaptive round: vLLM's rejection sampler against its plain sampler.

    python benchmarks/bench_sampler_cpu.py                       # Qwen2.5's vocabulary, 1, 16, 64 rows
    python benchmarks/bench_sampler_cpu.py --vocab 49152 --rows 16,64

With a speculative config vLLM 0.32 samples every step with the rejection sampler, drafts or not
(gpu_model_runner.py:2184), and at temperature > 0 it draws a vocabulary of exponentials for every
request (rejection_sampler.py:702). Side by side on the same bf16 logits, one thread (the worker's),
greedy and temperature 0.8:

* no request drafted: the plain sampler (what patches.py #10 runs) and the rejection sampler;
* one request drafted 3 tokens: the rejection sampler as vLLM runs it, and with patches.py #11
  (exponentials for drafted requests only).

The logits' clone, which each call needs, is timed alone and subtracted.
"""

from __future__ import annotations

import argparse
import time

import torch


def sampling_metadata(rows: int, greedy: bool):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    return SamplingMetadata(
        temperature=None if greedy else torch.full((rows,), 0.8),
        all_greedy=greedy,
        all_random=not greedy,
        top_p=None,
        top_k=None,
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(rows),
        presence_penalties=torch.zeros(rows),
        repetition_penalties=torch.ones(rows),
        output_token_ids=[[] for _ in range(rows)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
        spec_token_ids=[[] for _ in range(rows)],
    )


def round_metadata(drafts: list[list[int]]):
    """vLLM's metadata for one round (its make_dummy with the logit rows the runner computes):
    request i's draft rows, then its bonus row, one after the other."""
    import dataclasses

    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    dummy = SpecDecodeMetadata.make_dummy(drafts, device=torch.device("cpu"))
    ends = dummy.cu_num_sampled_tokens.long()
    starts = ends - torch.tensor([len(d) + 1 for d in drafts])
    target = [row for start, d in zip(starts.tolist(), drafts) for row in range(start, start + len(d))]
    return dataclasses.replace(
        dummy,
        target_logits_indices=torch.tensor(target, dtype=torch.int32),
        bonus_logits_indices=(ends - 1).int(),
        logits_indices=torch.arange(int(ends[-1]), dtype=torch.int32),
    )


def milliseconds(repeats: int, fn, *args) -> float:
    fn(*args)
    started = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    from vllm_specqd.adapter import patches
    from vllm_specqd.adapter.plugin import register

    register()  # patches.py #6, which the rejection sampler's temperature path needs on CPU
    current_platform.register_triton_kernel_overrides()
    torch.set_num_threads(1)
    sampler = Sampler()
    rejection = RejectionSampler(sampler)

    def verify_round(metadata, logits, md):
        return rejection(metadata, None, logits.clone(), md)

    print(f"vocab {args.vocab}, bf16 logits, 1 thread, ms per step (mean of {args.repeats})")
    print(
        "| rows | sampling | no drafts: plain sampler | no drafts: rejection sampler "
        "| 1 drafted: rejection sampler | same, draws for drafted rows only |"
    )
    print("|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        logits = torch.randn(rows, args.vocab).to(torch.bfloat16)
        no_drafts = round_metadata([[] for _ in range(rows)])
        one_drafted = round_metadata([[5, 6, 7]] + [[] for _ in range(rows - 1)])
        logits_drafted = torch.randn(rows + 3, args.vocab).to(torch.bfloat16)
        clone = milliseconds(args.repeats, logits.clone)
        clone_drafted = milliseconds(args.repeats, logits_drafted.clone)
        for greedy in (True, False):
            md = sampling_metadata(rows, greedy)
            plain = milliseconds(args.repeats, lambda x, m: sampler(x.clone(), m), logits, md) - clone
            patches._specqd_runner_built = False  # vLLM's rejection sampler, as it runs without specqd
            verify = milliseconds(args.repeats, verify_round, no_drafts, logits, md) - clone
            drafted = {}
            for specqd_worker in (False, True):
                patches._specqd_runner_built = specqd_worker
                drafted[specqd_worker] = (
                    milliseconds(args.repeats, verify_round, one_drafted, logits_drafted, md) - clone_drafted
                )
            mode = "greedy" if greedy else "T=0.8"
            print(f"| {rows} | {mode} | {plain:.2f} | {verify:.2f} | {drafted[False]:.2f} | {drafted[True]:.2f} |")


if __name__ == "__main__":
    main()
