"""What every exported format shares: the model directory, its tokenizer, and greedy decoding.

A `Runner` owns one loaded artifact and its KV cache. A runtime only implements `reset()` and
`forward(ids)` (append tokens to the cache, return their logits); chat rendering, the greedy loop
and stopping are the same code for PyTorch, ONNX Runtime, llama.cpp and the numpy GGUF reference,
so a difference in answers is a difference in the weights or the runtime, never in the loop.

This module knows no format: the format modules (merge, quantize, onnx_export, gguf_*) build on
it, and `formats.py` maps a format name to the loader that makes its Runner.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError


def require_model_dir(path: Path, what: str) -> None:
    """A transformers model directory with safetensors weights, or a ConfigError naming it."""
    if not path.is_dir():
        raise ConfigError(f"{path}: {what} not found (no such directory)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: {what} is not a model directory (no config.json)")
    if not list(path.glob("*.safetensors")):
        raise ConfigError(f"{path}: {what} has no *.safetensors weights")


def read_model_config(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path / 'config.json'}: unreadable ({err})") from None
    return data


def load_tokenizer_dir(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any failure here is a broken artifact
        raise ConfigError(f"{path}: cannot load the tokenizer ({type(err).__name__}: {err})"
                          ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def stop_ids(tok: Any, model_dir: Path | None = None) -> set[int]:
    """EOS ids the way the transformers backend stops: tokenizer EOS, generation config, pad."""
    ids: set[int] = set()
    for x in (tok.eos_token_id, tok.pad_token_id):
        if x is not None:
            ids.add(int(x))
    gen = model_dir / "generation_config.json" if model_dir else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return ids


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class Runner(ABC):
    """One loaded artifact. Subclasses implement `reset` and `forward`; decoding is shared."""

    fmt: str = ""
    batched = False
    """True when `generate_batch` runs several prompts at once (else one at a time)."""

    def __init__(self, tokenizer: Any, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache."""

    @abstractmethod
    def forward(self, ids: list[int]) -> np.ndarray:
        """Append `ids` to the cache; return logits [n, vocab] for the last n ≥ 1 of them."""

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        from distill.chat_template import render_chat

        text = render_chat(self.tokenizer, messages)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
        """Greedy decoding with the KV cache; the stop token is not returned."""
        self.reset()
        logits = self.forward(prompt_ids)[-1]
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits))
            if token in self.eos_ids:
                return out, "stop"
            out.append(token)
            if len(out) < max_new_tokens:
                logits = self.forward([token])[-1]
        return out, "length"

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int) -> Answer:
        prompt = self.encode_chat(messages)
        ids, finish = self.generate(prompt, max_new_tokens)
        return Answer(self.decode(ids), ids, finish, len(prompt))

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int
                       ) -> list[tuple[list[int], str]]:
        """Greedy answers to several prompts; one at a time unless the runtime batches."""
        return [self.generate(p, max_new_tokens) for p in prompts]

    def chat_batch(self, conversations: list[list[dict[str, str]]], max_new_tokens: int
                   ) -> list[Answer]:
        prompts = [self.encode_chat(m) for m in conversations]
        return [Answer(self.decode(ids), ids, finish, len(p))
                for p, (ids, finish) in zip(prompts, self.generate_batch(prompts,
                                                                         max_new_tokens),
                                            strict=True)]

    def describe(self) -> dict[str, Any]:
        """What the export row should say about this loaded runtime beyond its format's table
        entry (e.g. which GGUF backend ran and whose tokenizer): keys replace the row's, a
        `notes` list is appended to its notes. Nothing by default."""
        return {}

    def close(self) -> None:
        return None
