"""The sampling patches (patches.py #10 and #11) against vLLM's own samplers.

Run by tests/test_plugin.py in a fresh interpreter (see there why); runs alone too:
``pytest tests/sampling_patch_checks.py``.
"""

import pytest
import torch


def _sampling_metadata(batch: int, greedy: bool):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    return SamplingMetadata(
        temperature=None if greedy else torch.full((batch,), 0.8),
        all_greedy=greedy,
        all_random=not greedy,
        top_p=None,
        top_k=None,
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch),
        presence_penalties=torch.zeros(batch),
        repetition_penalties=torch.ones(batch),
        output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
        spec_token_ids=[[] for _ in range(batch)],
    )


def _spec_metadata(drafts: list[list[int]]):
    """vLLM's metadata for one round (its make_dummy with the logit rows the runner would compute):
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
            sampling_metadata=_sampling_metadata(batch, greedy), update_async_output_token_ids=lambda: None
        ),
        sampler=sampler,
        rejection_sampler=counted_rejection,
        use_async_scheduling=False,
        _draft_token_req_ids=None,
        _get_spec_decode_draft_probs=lambda metadata: None,
    )
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(1))
    no_drafts = _spec_metadata([[] for _ in range(batch)])

    torch.manual_seed(7)
    got = GPUModelRunner._sample(runner, logits.clone(), no_drafts).sampled_token_ids
    torch.manual_seed(7)
    want = rejection(no_drafts, None, logits.clone(), runner.input_batch.sampling_metadata).sampled_token_ids
    assert got.shape == want.shape == (batch, 1) and got.dtype == want.dtype
    assert torch.equal(got, want)
    assert calls == ([] if specqd else [0])

    drafts = _spec_metadata([[1, 2], [], [3], [], []])
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
        metadata = _sampling_metadata(len(drafts), greedy=False)
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
