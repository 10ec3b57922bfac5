"""The sampling patches (patches.py #10 and #11) against vLLM's own samplers.

Run by tests/test_plugin.py in a fresh interpreter (see there why); runs alone too:
``pytest tests/sampling_patch_checks.py``.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_sampler_cpu import round_metadata, sampling_metadata  # noqa: E402  vLLM's metadata for one round


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("specqd", [True, False], ids=["specqd", "other-method"])
def test_a_round_without_drafts_samples_plainly_and_picks_the_same_tokens(greedy, specqd):
    """patches.py #10: a round where no request drafted skips the rejection sampler (specqd engines
    only), and samples exactly the tokens the rejection sampler would have, same RNG draws included."""
    from types import SimpleNamespace

    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_specqd.adapter.plugin import register

    register()
    current_platform.register_triton_kernel_overrides()
    batch, vocab = 5, 300
    sampler = Sampler()
    rejection = RejectionSampler(sampler)
    calls = []

    def counted_rejection(*args):
        calls.append(args[0].max_spec_len)
        return rejection(*args)

    runner = SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config={"specqd": {"num_speculative_tokens": 2}} if specqd else {}),
        input_batch=SimpleNamespace(
            sampling_metadata=sampling_metadata(batch, greedy), update_async_output_token_ids=lambda: None
        ),
        sampler=sampler,
        rejection_sampler=counted_rejection,
        use_async_scheduling=False,
        _draft_token_req_ids=None,
        _get_spec_decode_draft_probs=lambda metadata: None,
    )
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(1))
    no_drafts = round_metadata([[] for _ in range(batch)])

    torch.manual_seed(7)
    got = GPUModelRunner._sample(runner, logits.clone(), no_drafts).sampled_token_ids
    torch.manual_seed(7)
    want = rejection(no_drafts, None, logits.clone(), runner.input_batch.sampling_metadata).sampled_token_ids
    assert got.shape == want.shape == (batch, 1) and got.dtype == want.dtype
    assert torch.equal(got, want)
    assert calls == ([] if specqd else [0])

    drafts = round_metadata([[1, 2], [], [3], [], []])
    logits = torch.randn(batch + 3, vocab)
    assert GPUModelRunner._sample(runner, logits, drafts).sampled_token_ids.shape == (batch, 3)
    assert calls[-1] == 2  # a round with drafts is verified by the rejection sampler


@pytest.mark.parametrize("with_draft_probs", [False, True], ids=["one-hot-drafts", "draft-probs"])
def test_recovered_tokens_are_drawn_for_drafted_requests_only_with_the_same_result(monkeypatch, with_draft_probs):
    """patches.py #11: in a specqd worker, the rejection sampler's vocabulary-wide exponentials are
    drawn for drafted requests only. Seeded requests draw from their own generators, so every
    recovered token is the one vLLM's own code picks."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    from vllm_specqd.adapter import patches
    from vllm_specqd.adapter.plugin import register

    register()
    current_platform.register_triton_kernel_overrides()
    drafts = [[3, 1], [], [7], [], [2, 2, 5], []]
    num_draft = [len(d) for d in drafts]
    tokens, vocab = sum(num_draft), 1000
    cu = torch.tensor(num_draft).cumsum(0).int()
    draft_ids = torch.tensor(sum(drafts, []), dtype=torch.int32)
    target_probs = torch.randn(tokens, vocab, generator=torch.Generator().manual_seed(0)).softmax(-1)
    draft_probs = torch.rand(tokens, vocab).softmax(-1) if with_draft_probs else None
    draws = []

    def recovered(specqd_worker: bool):
        monkeypatch.setattr(patches, "_specqd_runner_built", specqd_worker)
        generators = {i: torch.Generator().manual_seed(100 + i) for i in range(len(drafts))}
        metadata = sampling_metadata(len(drafts), greedy=False)
        metadata = type(metadata)(**{**metadata.__dict__, "generators": generators})
        shapes = []
        real_exponential = torch.Tensor.exponential_
        monkeypatch.setattr(
            torch.Tensor, "exponential_", lambda t, *a, **k: shapes.append(t.shape) or real_exponential(t, *a, **k)
        )
        out = rejection_sampler.sample_recovered_tokens(
            max(num_draft), num_draft, cu, draft_ids, draft_probs, target_probs, metadata, torch.device("cpu")
        )
        monkeypatch.setattr(torch.Tensor, "exponential_", real_exponential)
        draws.append(shapes[0])  # the batch-wide draw
        return out

    assert torch.equal(recovered(specqd_worker=True), recovered(specqd_worker=False))
    assert draws == [(3, vocab), (len(drafts), vocab)]
