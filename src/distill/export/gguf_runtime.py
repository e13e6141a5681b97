"""Running a GGUF file: llama.cpp (llama-cpp-python) when it is installed, else a numpy
reference forward pass.

`GGUFNumpyModel` runs the dequantized GGUF tensors with GGML's conventions (interleaved RoPE on
the permuted weights) for `llama` and `qwen2` files, which proves the file — not just the source
model — computes the student. Other architectures are exported but not measured without
llama.cpp. `LlamaCppRunner` checks that llama.cpp tokenizes like tokenizer.json before trusting
its own tokenizer, and otherwise feeds it the transformers tokenizer's ids. When it does, and
the GGUF's embedded chat template renders as the student's, answers come from llama.cpp's chat
API (`Llama.create_chat_completion`, greedy) — the way an edge user runs the file — rather than
from the shared token loop; `describe()` says which.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

from distill.config import ConfigError
from distill.export.files import GGUF_FILE
from distill.export.gguf_file import SUPPORTED, read_gguf
from distill.export.runtime import (
    Answer,
    Runner,
    load_tokenizer_dir,
    read_model_config,
    stop_ids,
)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


class GGUFNumpyModel:
    """Reference forward pass from the GGUF tensors alone (no torch), with a KV cache."""

    def __init__(self, path: Path) -> None:
        meta, _ = read_gguf(path, tensors=False)
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED:
            raise ConfigError(f"{path}: the numpy GGUF reference runs {', '.join(SUPPORTED)}, "
                              f"not {arch!r} (install llama-cpp-python to run it)")
        meta, self.t = read_gguf(path)
        self.arch = str(arch)
        self.n_layers = int(meta[f"{arch}.block_count"])
        self.n_head = int(meta[f"{arch}.attention.head_count"])
        self.n_kv = int(meta[f"{arch}.attention.head_count_kv"])
        self.head_dim = int(meta.get(f"{arch}.attention.key_length")
                            or meta[f"{arch}.embedding_length"] // self.n_head)
        self.eps = float(meta[f"{arch}.attention.layer_norm_rms_epsilon"])
        base = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
        d = self.head_dim
        self.inv_freq = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
        self.output = self.t.get("output.weight", self.t["token_embd.weight"])
        self.meta = meta
        self.reset()

    def reset(self) -> None:
        self.k: list[np.ndarray] = [np.zeros((self.n_kv, 0, self.head_dim), np.float32)
                                    for _ in range(self.n_layers)]
        self.v: list[np.ndarray] = [np.zeros_like(k) for k in self.k]
        self.length = 0

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [heads, n, d]; GGML 'normal' mode rotates (2i, 2i+1), NEOX mode (i, i + d/2)."""
        ang = pos[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        if self.arch == "llama":
            x0, x1 = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x0 * cos - x1 * sin
            out[..., 1::2] = x0 * sin + x1 * cos
            return out
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)

    def forward(self, ids: list[int]) -> np.ndarray:
        t, n = self.t, len(ids)
        pos = np.arange(self.length, self.length + n, dtype=np.float64)
        x = t["token_embd.weight"][np.asarray(ids)]
        group = self.n_head // self.n_kv
        total = self.length + n
        # Causal mask over [cached + new] keys for the n new queries.
        mask = np.where(np.arange(total)[None, :] <= (self.length + np.arange(n))[:, None],
                        0.0, -np.inf).astype(np.float32)
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = _rms_norm(x, t[p + "attn_norm.weight"], self.eps)
            qkv = []
            for name, heads in (("attn_q", self.n_head), ("attn_k", self.n_kv),
                                ("attn_v", self.n_kv)):
                y = h @ t[p + name + ".weight"].T
                if p + name + ".bias" in t:
                    y = y + t[p + name + ".bias"]
                qkv.append(y.reshape(n, heads, self.head_dim).transpose(1, 0, 2))
            q, k, v = qkv
            q, k = self._rope(q, pos), self._rope(k, pos)
            self.k[i] = np.concatenate([self.k[i], k], axis=1)
            self.v[i] = np.concatenate([self.v[i], v], axis=1)
            keys = np.repeat(self.k[i], group, axis=0)
            vals = np.repeat(self.v[i], group, axis=0)
            scores = q @ keys.transpose(0, 2, 1) / math.sqrt(self.head_dim) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ vals
            o = att.transpose(1, 0, 2).reshape(n, -1) @ t[p + "attn_output.weight"].T
            if p + "attn_output.bias" in t:
                o = o + t[p + "attn_output.bias"]
            x = x + o
            h = _rms_norm(x, t[p + "ffn_norm.weight"], self.eps)
            g = h @ t[p + "ffn_gate.weight"].T
            up = h @ t[p + "ffn_up.weight"].T
            x = x + ((g / (1.0 + np.exp(-g))) * up) @ t[p + "ffn_down.weight"].T
        self.length = total
        x = _rms_norm(x, t["output_norm.weight"], self.eps)
        return np.asarray(x @ self.output.T, dtype=np.float32)


class GGUFNumpyRunner(Runner):
    fmt = "gguf"
    backend = "numpy"

    def __init__(self, path: Path) -> None:
        self.model = GGUFNumpyModel(path / GGUF_FILE)
        tok = load_tokenizer_dir(path)
        super().__init__(tok, stop_ids(tok, path))

    def reset(self) -> None:
        self.model.reset()

    def forward(self, ids: list[int]) -> np.ndarray:
        return self.model.forward(ids)

    def describe(self) -> dict[str, Any]:
        return {"runtime": "numpy reference forward from the GGUF tensors (llama-cpp-python "
                           "not installed)"}


# Words, digits of several place values, punctuation and a newline: what a tokenizer must split
# the same way for llama.cpp's own tokenization to be trusted.
TOKENIZER_PROBE = ("Tom has 12 apples and buys 345 more, then 6,078 pears: 12 + 345 = 357.\n"
                   "The answer is 357.")


# Conversations the GGUF's chat template must render as the student's own before the chat API
# answers: with and without a system turn, and a second user turn.
CHAT_PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": TOKENIZER_PROBE}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 3?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "What is 2 + 3?"}],
)


def _repack_allowed() -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types (AMX / interleaved).

    Measured: on a Sapphire Rapids CPU with AMX inside a Firecracker VM, llama-cpp-python 0.3.36
    built with GGML_NATIVE segfaults on the first decode of any q8_0 GGUF (f16/f32 run; with
    repacking off q8_0 runs too). So repacking is off where the CPU advertises AMX, on elsewhere;
    `DISTILL_LLAMA_REPACK=0|1` overrides either way.
    """
    forced = os.environ.get("DISTILL_LLAMA_REPACK")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "amx_tile" not in flags


@contextmanager
def _weight_repacking(allowed: bool) -> Iterator[None]:
    """llama-cpp-python's `Llama` exposes no `use_extra_bufts`: it reads the model defaults from
    `llama_model_default_params()`, so that function is wrapped while the model loads."""
    if allowed:
        yield
        return
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    with _PARAMS_LOCK:
        llama_module.llama_cpp.llama_model_default_params = defaults
        try:
            yield
        finally:
            llama_module.llama_cpp.llama_model_default_params = original


_PARAMS_LOCK = threading.Lock()


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python; tokenization by llama.cpp from the GGUF vocabulary."""

    fmt = "gguf"
    backend = "llama.cpp"

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 2048,
                 logits_all: bool = False) -> None:
        from llama_cpp import Llama

        model_file = path / GGUF_FILE
        read_gguf_header(model_file)
        self.path = path
        tok = load_tokenizer_dir(path)  # the chat template renders as in transformers
        super().__init__(tok, stop_ids(tok, path))
        cfg = read_model_config(path) if (path / "config.json").is_file() else {}
        n_ctx = min(n_ctx, int(cfg.get("max_position_embeddings", n_ctx)))
        try:
            # n_threads_batch too: left unset it is every core, and prefill threads that
            # spin-wait on a busy machine cost more than a model this small computes.
            with _weight_repacking(_repack_allowed()):
                self.llm = Llama(model_path=str(model_file), n_ctx=n_ctx,
                                 n_batch=min(512, n_ctx), n_threads=threads,
                                 n_threads_batch=threads, logits_all=logits_all, verbose=False)
        except Exception as err:  # noqa: BLE001 - llama.cpp refused the file
            raise ConfigError(f"{model_file}: llama.cpp cannot load it ({err})") from None
        self.logits_all = logits_all
        self.tokenizer_note = self._check_tokenizer()
        self.own_tokenizer = self.tokenizer_note is None
        self.chat_api_note = self._check_chat_template() if self.own_tokenizer else None
        self.chat_api = self.own_tokenizer and self.chat_api_note is None
        if self.chat_api:
            self.llm.chat_format = "chat_template.default"  # the GGUF's template, never a guess

    def _check_tokenizer(self) -> str | None:
        """None when llama.cpp tokenizes and detokenizes a probe chat exactly as tokenizer.json
        does; else why not — then token ids come from the transformers tokenizer and llama.cpp
        runs the weights only (llama.cpp applies no tokenizer.json normalizer, e.g. the demo
        tokenizer's place-value digit marks)."""
        from distill.chat_template import render_chat

        text = render_chat(self.tokenizer, [{"role": "user", "content": TOKENIZER_PROBE}])
        text += TOKENIZER_PROBE
        want = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        got = list(self.llm.tokenize(text.encode(), add_bos=False, special=True))
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False))
                          if a != b),
                         min(len(got), len(want)))
            why = "; tokenizer.json has a normalizer llama.cpp does not apply" \
                if self._has_normalizer() else ""
            return (f"llama.cpp's own tokenizer splits text differently from tokenizer.json "
                    f"(probe: {len(got)} vs {len(want)} tokens, first difference at token "
                    f"{first}{why}): prompts are tokenized and answers decoded by the "
                    "transformers tokenizer, llama.cpp runs the weights on those token ids")
        ref = str(self.tokenizer.decode(want, skip_special_tokens=True)).strip()
        dec = self.llm.detokenize([t for t in want if t not in self._special_ids()])
        if dec.decode("utf-8", errors="replace").strip() != ref:
            return ("llama.cpp detokenizes differently from tokenizer.json: answers decoded by "
                    "the transformers tokenizer, llama.cpp runs the weights")
        return None

    def _check_chat_template(self) -> str | None:
        """None when the GGUF's `tokenizer.chat_template`, rendered as llama-cpp-python renders
        it (Jinja2ChatFormatter, the GGUF's bos/eos texts), gives the probe conversations the
        prompt text the student's own template gives; else why not — then answers come from the
        shared token loop."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from distill.chat_template import render_chat

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return "the GGUF has no tokenizer.chat_template: answers from the token loop"
        model = self.llm._model
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        formatter = Jinja2ChatFormatter(
            template=template, bos_token=model.token_get_text(bos) if bos != -1 else "",
            eos_token=model.token_get_text(eos) if eos != -1 else "")
        for messages in CHAT_PROBES:
            try:
                got = formatter(messages=cast(Any, messages)).prompt  # TypedDicts there
            except Exception as err:  # noqa: BLE001 - a template llama.cpp cannot render
                return (f"the GGUF's chat template fails in llama-cpp-python ({err}): answers "
                        "from the token loop")
            if got != render_chat(self.tokenizer, messages):
                return ("the GGUF's chat template renders differently from the student's: "
                        "answers from the token loop")
        return None

    def _has_normalizer(self) -> bool:
        path = self.path / "tokenizer.json"
        return path.is_file() and bool(json.loads(path.read_text()).get("normalizer"))

    def _special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []) or [])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.own_tokenizer:
            return super().encode_chat(messages)
        from distill.chat_template import render_chat

        text = render_chat(self.tokenizer, messages)
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def decode(self, ids: list[int]) -> str:
        if not self.own_tokenizer:
            return super().decode(ids)
        return self.llm.detokenize(ids).decode("utf-8", errors="replace").strip()

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int) -> Answer:
        """The answer from llama.cpp's chat API where it applies (`chat_api`), else from the
        shared greedy loop (`Runner.chat`)."""
        if not self.chat_api or max_new_tokens < 1:  # the API reads max_tokens 0 as no limit
            return super().chat(messages, max_new_tokens)
        return self.chat_completion(messages, max_new_tokens)

    def chat_completion(self, messages: list[dict[str, str]], max_new_tokens: int) -> Answer:
        """Greedy `create_chat_completion`: the GGUF's template, llama.cpp's tokenizer, its
        end-of-generation tokens. The cache is emptied first so the prompt is evaluated in one
        prefill, as `Runner.generate` does — the same logits, so the same greedy answer."""
        self.llm.reset()
        out: Any = self.llm.create_chat_completion(messages=cast(Any, messages),
                                                   temperature=0.0, max_tokens=max_new_tokens)
        usage, choice = out["usage"], out["choices"][0]
        n_prompt, n_done = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        ids = [int(t) for t in self.llm.input_ids[n_prompt:self.llm.n_tokens]]  # a buffer
        if len(ids) < n_done:
            # The last token sampled is returned but never evaluated, so it is not in the
            # context; greedy picked it as the argmax of the last logits.
            ids.append(int(np.argmax(self._last_logits())))
        finish = "stop" if choice["finish_reason"] == "stop" else "length"
        return Answer(str(choice["message"]["content"] or "").strip(), ids[:n_done], finish,
                      n_prompt)

    def _last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

    def reset(self) -> None:
        self.llm.reset()

    def forward(self, ids: list[int]) -> np.ndarray:
        start = self.llm.n_tokens
        self.llm.eval(ids)
        if self.logits_all:
            return np.array(self.llm.scores[start:self.llm.n_tokens], dtype=np.float32)
        # Without logits_all, Llama.eval keeps no scores: read the last token's logits from the
        # context (keeping every position would cost n_ctx × vocab floats).
        return self._last_logits().astype(np.float32)[None]

    def describe(self) -> dict[str, Any]:
        """The runtime, whose tokenizer made the token ids, how answers were generated, and why
        when not by llama.cpp's own tokenizer and chat API."""
        answers = ("llama.cpp chat API (Llama.create_chat_completion, the GGUF's chat "
                   "template, temperature 0)" if self.chat_api else
                   "greedy token loop over Llama.eval (distill's Runner.generate)")
        notes = [n for n in (self.tokenizer_note, self.chat_api_note) if n]
        return {"runtime": "llama.cpp (llama-cpp-python)",
                "tokenizer": "llama.cpp" if self.own_tokenizer else "transformers",
                "answers": answers, "notes": notes}

    def close(self) -> None:
        self.llm.close()


def read_gguf_header(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{path}: GGUF file not found")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ConfigError(f"{path}: not a GGUF file (bad magic)")


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load_gguf_runner(path: Path, threads: int | None = None, backend: str = "auto") -> Runner:
    """llama.cpp when installed (backend auto|llama.cpp), else the numpy reference."""
    read_gguf_header(path / GGUF_FILE)
    if backend == "llama.cpp" or (backend == "auto" and llama_cpp_available()):
        return LlamaCppRunner(path, threads=threads)
    return GGUFNumpyRunner(path)
