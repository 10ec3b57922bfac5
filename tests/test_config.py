"""The specqd config: validation, files, and translation into vLLM's config (no engine)."""

import json

import pytest

from vllm_specqd.config import (
    AdaptiveSpec,
    ModelLevel,
    NgramLevel,
    SpecQDConfigError,
    from_dict,
    load_speculative_config_arg,
    parse_config,
)

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


def specqd(**extra):
    return {"method": "specqd", "num_speculative_tokens": 6, **extra}


def test_defaults():
    cfg = parse_config(specqd())
    assert cfg.num_speculative_tokens == 6
    assert (cfg.draft.quantization, cfg.draft.scale_rule) == ("mxfp4", "mse")
    assert cfg.draft_sample_method == "probabilistic"
    assert cfg.inner is None
    assert parse_config(specqd(inner=NGRAM)).draft_sample_method == "greedy"


def test_round_trip_is_json():
    cfg = parse_config(
        specqd(draft={"scale_rule": "floor"}, inner={**NGRAM, "prompt_lookup_min": 3, "prompt_lookup_max": 4})
    )
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_adaptive_forms():
    assert parse_config(specqd()).adaptive == AdaptiveSpec(enabled=True)  # on by default (README)
    assert parse_config(specqd(adaptive=True)).adaptive == AdaptiveSpec(enabled=True)
    assert parse_config(specqd(adaptive=False)).adaptive.enabled is False
    cfg = parse_config(specqd(adaptive={"min_gain": 0.05}))
    assert cfg.adaptive == AdaptiveSpec(enabled=True, min_gain=0.05)  # an object means on unless enabled: false
    assert parse_config(specqd(adaptive={"enabled": False, "min_gain": 1})).adaptive.enabled is False
    cfg = parse_config(specqd(adaptive={"policy": "random", "seed": 3, "reprobe_after": 32}))
    assert (cfg.adaptive.policy, cfg.adaptive.seed, cfg.adaptive.reprobe_after) == ("random", 3, 32)
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "raw, message",
    [
        (specqd(adaptive="yes"), "'adaptive' must be true, false or an object"),
        (specqd(adaptive=1), "'adaptive' must be true, false or an object"),
        (specqd(adaptive={"k_max": 3}), "'adaptive.k_max' is not a known key"),
        (specqd(adaptive={"enabled": "on"}), "'adaptive.enabled' must be true or false"),
        (specqd(adaptive={"min_gain": -0.1}), "'adaptive.min_gain' must be a number in 0..10"),
        (specqd(adaptive={"min_gain": "5%"}), "'adaptive.min_gain' must be a number in 0..10"),
        (specqd(adaptive={"policy": "oracle"}), "'adaptive.policy' must be one of ['cost', 'random', 'off']"),
        (specqd(adaptive={"reprobe_after": 0}), "'adaptive.reprobe_after' must be in 1..4096"),
        (specqd(drafts={}), "'drafts' is not a known key"),
        (specqd(draft={"bits": 4}), "'draft.bits' is not a known key"),
        ({"method": "specqd"}, "'num_speculative_tokens' is required"),
        (specqd(num_speculative_tokens="6"), "must be an integer in 1..16, got '6'"),
        (specqd(num_speculative_tokens=True), "must be an integer in 1..16, got True"),
        (specqd(num_speculative_tokens=0), "must be in 1..16, got 0"),
        (specqd(num_speculative_tokens=17), "must be in 1..16, got 17"),
        (specqd(draft={"scale_rule": "max"}), "'draft.scale_rule' must be one of ['floor', 'rceil', 'mse']"),
        (specqd(draft={"quantization": "int4"}), "'draft.quantization' must be one of ['mxfp4']"),
        (specqd(draft={"cpu_dequantize_once": True}), "'draft.cpu_dequantize_once' was replaced by 'draft.cpu_kernel'"),
        (specqd(draft={"cpu_kernel": "w4a4"}), "'draft.cpu_kernel' must be one of"),
        (specqd(draft={"lm_head": "bf16"}), "'draft.lm_head' must be one of"),
        (specqd(draft_sample_method="top1"), "must be one of ['greedy', 'probabilistic']"),
        (
            specqd(inner={**NGRAM, "num_speculative_tokens": 7}),
            "is 7, larger than the level above's num_speculative_tokens=6",
        ),
        (
            specqd(inner={"method": "eagle", "num_speculative_tokens": 2}),
            "'inner.method' must be one of ['ngram', 'draft_model']",
        ),
        (specqd(inner={"num_speculative_tokens": 2}), "'inner.method' is required"),
        (specqd(inner={**NGRAM, "model": "/x"}), "'inner.model' is not a known key"),
        (specqd(inner={**NGRAM, "prompt_lookup_min": 5, "prompt_lookup_max": 2}), "must be <= prompt_lookup_max"),
        (specqd(inner={"method": "draft_model", "num_speculative_tokens": 2}), "'inner.model' is required"),
        (
            specqd(inner={"method": "draft_model", "model": "/no/such/dir", "num_speculative_tokens": 2}),
            "is not a local checkpoint directory",
        ),
        (
            specqd(inner=NGRAM, draft_sample_method="probabilistic"),
            "must be 'greedy' when 'inner' levels are configured",
        ),
        ([1, 2], "must be an object/dict"),
    ],
)
def test_bad_configs_name_the_key(raw, message):
    with pytest.raises(SpecQDConfigError) as error:
        parse_config(raw)
    assert message in str(error.value)


def test_cycle_in_config_objects_is_refused(small_model_dir):
    raw = specqd()
    raw["inner"] = {"method": "draft_model", "model": str(small_model_dir), "num_speculative_tokens": 2}
    raw["inner"]["inner"] = raw["inner"]
    with pytest.raises(SpecQDConfigError, match="cycle"):
        parse_config(raw)


def test_cycle_through_model_paths_is_refused(model_dir, small_model_dir):
    inner = {"method": "draft_model", "model": str(small_model_dir), "num_speculative_tokens": 3}
    inner["inner"] = {"method": "draft_model", "model": str(small_model_dir), "num_speculative_tokens": 2}
    with pytest.raises(SpecQDConfigError, match="already drafts at an outer level"):
        parse_config(specqd(inner=inner))
    with pytest.raises(SpecQDConfigError, match="already drafts at an outer level"):
        parse_config(specqd(inner={**inner, "model": str(model_dir), "inner": None}), target_model=str(model_dir))


def test_three_levels_parse(small_model_dir):
    cfg = parse_config(
        specqd(
            inner={
                "method": "draft_model",
                "model": str(small_model_dir),
                "quantization": "mxfp4",
                "num_speculative_tokens": 3,
                "inner": {**NGRAM, "num_speculative_tokens": 2},
            }
        )
    )
    assert [type(level) for level in cfg.levels()] == [ModelLevel, NgramLevel]
    assert cfg.levels()[1] == NgramLevel(2, prompt_lookup_min=2, prompt_lookup_max=5)
    assert from_dict(cfg.to_dict()) == cfg


def test_workers_parse_once_and_skip_the_file_checks(small_model_dir):
    inner = {"method": "draft_model", "model": str(small_model_dir), "num_speculative_tokens": 2}
    data = parse_config(specqd(inner=inner)).to_dict()
    assert from_dict(data) is from_dict(json.loads(json.dumps(data)))  # one parse per content
    # A worker trusts the front end's checks: a path it cannot see is no error until it loads.
    moved = {**data, "inner": {**data["inner"], "model": "/elsewhere/small"}}
    assert from_dict(moved).inner.model == "/elsewhere/small"
    with pytest.raises(SpecQDConfigError, match="not a local checkpoint directory"):
        parse_config(moved)


def test_config_argument_accepts_inline_json_and_files(tmp_path):
    assert (
        load_speculative_config_arg('{"method": "specqd", "num_speculative_tokens": 2}')["num_speculative_tokens"] == 2
    )
    (tmp_path / "a.json").write_text(json.dumps(specqd()))
    (tmp_path / "a.yaml").write_text(
        "method: specqd\nnum_speculative_tokens: 3\ninner:\n  method: ngram\n  num_speculative_tokens: 2\n"
    )
    assert load_speculative_config_arg(str(tmp_path / "a.json")) == specqd()
    assert load_speculative_config_arg(str(tmp_path / "a.yaml"))["inner"]["method"] == "ngram"
    assert load_speculative_config_arg("None") is None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.json", None, "is neither inline JSON nor an existing"),
        ("a.toml", "x = 1", "must end in .json, .yaml or .yml"),
        ("bad.json", "{not json", "cannot parse"),
        ("bad.yaml", "a: [1", "cannot parse"),
        ("list.yaml", "- 1\n- 2\n", "must hold an object"),
    ],
)
def test_config_argument_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(SpecQDConfigError, match=message):
        load_speculative_config_arg(str(tmp_path / name))
    with pytest.raises(SpecQDConfigError, match="invalid inline JSON"):
        load_speculative_config_arg("{oops")


# ------------------------------------------------------------ vLLM translation


def engine_config(model_dir, spec, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024, speculative_config=spec, **kwargs
    )
    return args.create_engine_config()


def test_translated_into_vllm_draft_model_machinery(model_dir):
    cfg = engine_config(model_dir, specqd(inner=NGRAM))
    spec = cfg.speculative_config
    assert (spec.method, spec.model, spec.quantization) == ("draft_model", str(model_dir), "specqd_mxfp4")
    assert spec.num_speculative_tokens == 6
    assert from_dict(cfg.additional_config["specqd"]) == parse_config(specqd(inner=NGRAM))
    assert cfg.scheduler_config.async_scheduling is False  # inner levels read committed tokens
    assert cfg.use_v2_model_runner is False
    # vLLM reserves the K lookahead KV slots of draft-model methods for us.
    assert spec.uses_draft_model()


def test_capture_hook_reads_a_prefix_to_scale_rule_map(small_model_dir):
    from vllm_specqd.adapter.draft_builder import capture_rules, scale_rule_for

    inner = {"method": "draft_model", "model": str(small_model_dir), "num_speculative_tokens": 3}
    inner["quantization"], inner["scale_rule"] = "mxfp4", "rceil"
    inner["inner"] = {**NGRAM, "num_speculative_tokens": 2}
    cfg = parse_config(specqd(draft={"scale_rule": "floor"}, inner=inner))
    rules = capture_rules(cfg)
    assert rules == (("draft_model", None), ("specqd_inner2", "rceil"), ("", "floor"))
    assert capture_rules(from_dict(cfg.to_dict())) is rules  # built once per config
    assert scale_rule_for("model.layers.0.mlp.down_proj", rules) == "floor"  # the target: level 1's copy
    assert scale_rule_for("draft_model.model.layers.0.mlp.down_proj", rules) is None  # MXFP4 already
    assert scale_rule_for("specqd_inner2.model.layers.3.self_attn.o_proj", rules) == "rceil"
    unquantized = parse_config(specqd(inner={**inner, "quantization": None, "inner": None}))
    assert scale_rule_for("specqd_inner2.lm_head", capture_rules(unquantized)) is None


def test_other_methods_are_untouched(model_dir):
    cfg = engine_config(model_dir, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    assert cfg.speculative_config.method == "ngram"
    assert "specqd" not in cfg.additional_config


def test_bad_config_raises_before_anything_starts(model_dir):
    with pytest.raises(SpecQDConfigError, match="'num_speculative_tokens' must be in 1..16, got 0"):
        engine_config(model_dir, specqd(num_speculative_tokens=0))


def test_async_scheduling_with_inner_levels_is_refused(model_dir):
    with pytest.raises(SpecQDConfigError, match="need async_scheduling off"):
        engine_config(model_dir, specqd(inner=NGRAM), async_scheduling=True)


def test_pipeline_parallelism_is_refused(model_dir):
    """Under PP the drafter lives on the last stage, which lacks the other stages' layers to cast."""
    with pytest.raises(SpecQDConfigError, match="'pipeline_parallel_size' = 2 is not supported.*last stage"):
        engine_config(model_dir, specqd(), pipeline_parallel_size=2)
    # Without specqd, vLLM accepts the same arguments: the refusal is ours alone.
    assert engine_config(model_dir, None, pipeline_parallel_size=2).parallel_config.pipeline_parallel_size == 2


def test_async_scheduling_with_adaptive_is_refused(model_dir):
    with pytest.raises(SpecQDConfigError, match="'adaptive' needs async_scheduling off"):
        engine_config(model_dir, specqd(adaptive=True), async_scheduling=True)
    assert engine_config(model_dir, specqd(adaptive=True)).scheduler_config.async_scheduling is False


def test_async_scheduling_turns_default_adaptive_off_with_a_warning(model_dir, caplog):
    """Adaptive is on by default; a user who asked for async scheduling keeps it, with fixed K."""
    with caplog.at_level("WARNING"):
        cfg = engine_config(model_dir, specqd(), async_scheduling=True)
    # (vLLM's CPU platform then turns async scheduling off itself, platforms/cpu.py:331.)
    assert from_dict(cfg.additional_config["specqd"]).adaptive.enabled is False
    assert "adaptive speculation (on by default) is off" in caplog.text
    assert from_dict(engine_config(model_dir, specqd()).additional_config["specqd"]).adaptive.enabled is True


def test_different_vocabulary_is_refused(model_dir, small_model_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((small_model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 32000}))
    inner = {"method": "draft_model", "model": str(other), "num_speculative_tokens": 2}
    with pytest.raises(SpecQDConfigError, match="has vocab_size 32000, the target has 49152"):
        engine_config(model_dir, specqd(inner=inner))


@pytest.mark.parametrize(
    "quantization_config, name",
    [
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, "auto_gptq"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, "awq"),
    ],
)
def test_quantized_target_is_refused(model_dir, tmp_path, quantization_config, name):
    import shutil

    quantized = tmp_path / "quantized-target"
    shutil.copytree(model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecQDConfigError, match=f"the target is already quantized \\('{name}'\\)"):
        engine_config(quantized, specqd())
