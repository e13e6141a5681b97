"""Measuring an artifact in its runtime: accuracy, CPU latency per answer, peak memory.

- accuracy: the evaluate stage's own scorer (`score_model`: `parse_response` + `answers_match`)
  over the held-out set, capped at `export.eval_limit` items, greedy decoding;
- latency: `export.latency_prompts` held-out prompts answered one at a time after one warm-up
  answer; p50/p95 of the wall time per answer, tokens/s = generated tokens / total time;
- peak memory: resident set size (RSS) sampled every 2 ms from /proc/self/statm while the artifact
  loads and answers the latency prompts, minus the RSS just before loading (freed heap returned
  to the OS first with malloc_trim). It counts what the runtime really maps — torch, ONNX
  Runtime and llama.cpp allocate outside Python, where tracemalloc sees nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.config import PipelineConfig
from distill.export.runtime import Runner
from distill.teachers.base import Completion, Job

PEAK_MEM_METHOD = "RSS delta (peak sampled every 2 ms during load + latency prompts)"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process-lifetime peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Context manager: peak RSS above the level at entry, in MB."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        _trim_heap()
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta_mb(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)


def eval_items(cfg: PipelineConfig, limited: bool = True) -> list[dict[str, Any]]:
    """Held-out items for the export measurements (seeds when there is no evaluate section),
    capped at `export.eval_limit` unless `limited` is False."""
    from distill.seeds import load_eval_set, load_seeds

    items = load_eval_set(cfg) if cfg.evaluate is not None else load_seeds(cfg)
    limit = cfg.export.eval_limit if cfg.export and limited else None
    return items[:limit] if limit else items


def max_new_tokens(cfg: PipelineConfig) -> int:
    if cfg.export and cfg.export.max_new_tokens:
        return cfg.export.max_new_tokens
    return cfg.evaluate.max_tokens if cfg.evaluate else cfg.generate.max_tokens


def prompt_messages(cfg: PipelineConfig, question: str) -> list[dict[str, str]]:
    from distill.generate.templates import chat_messages

    return chat_messages(cfg.resolve(cfg.generate.prompt), cfg.generate.system_prompt,
                         question=question)


class RunnerTeacher:
    """A Runner behind the teacher protocol, so `score_model` scores it like evaluate does."""

    backend = "export"

    def __init__(self, runner: Runner, max_tokens: int, name: str, batch_size: int = 1) -> None:
        self.runner = runner
        self.max_tokens = max_tokens
        self.model = name
        self.model_id = name
        self.batch_size = batch_size

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, int, Completion]]:
        if self.runner.batched and self.batch_size > 1:
            async for out in self._stream_batched(jobs):
                yield out
            return
        for job in jobs:
            for s in job.samples:
                t0 = time.perf_counter()
                try:
                    ans = self.runner.chat(job.messages, min(job.params.max_tokens,
                                                             self.max_tokens))
                    comp = Completion(text=ans.text, finish_reason=ans.finish_reason,
                                      prompt_tokens=ans.prompt_tokens,
                                      completion_tokens=len(ans.token_ids),
                                      latency_s=time.perf_counter() - t0,
                                      token_ids=ans.token_ids)
                except Exception as err:  # noqa: BLE001 - a failed answer is an error row
                    comp = Completion(error=f"{type(err).__name__}: {err}")
                yield job, s, comp

    async def _stream_batched(self, jobs: Sequence[Job]
                              ) -> AsyncIterator[tuple[Job, int, Completion]]:
        """`batch_size` prompts at a time through `Runner.chat_batch` (the runtime's batch)."""
        todo = [(job, s) for job in jobs for s in job.samples]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            t0 = time.perf_counter()
            limit = min(min(job.params.max_tokens for job, _ in chunk), self.max_tokens)
            try:
                answers = self.runner.chat_batch([job.messages for job, _ in chunk], limit)
            except Exception as err:  # noqa: BLE001 - a failed batch is error rows
                for job, s in chunk:
                    yield job, s, Completion(error=f"{type(err).__name__}: {err}")
                continue
            per = (time.perf_counter() - t0) / len(chunk)
            for (job, s), ans in zip(chunk, answers, strict=True):
                yield job, s, Completion(text=ans.text, finish_reason=ans.finish_reason,
                                         prompt_tokens=ans.prompt_tokens,
                                         completion_tokens=len(ans.token_ids), latency_s=per,
                                         token_ids=ans.token_ids)

    async def aclose(self) -> None:
        return None


def scorer(runner: Runner, cfg: PipelineConfig, name: str) -> Any:
    """What answers the held-out set: a PyTorch artifact through the evaluate stage's own
    batched transformers backend (`evaluate.batch_size`, left padding — the path that scored the
    student), any other runtime through its `Runner` (batched where it batches: ONNX Runtime;
    one prompt at a time: llama.cpp, the numpy GGUF reference)."""
    from distill.export.merge import TorchRunner

    assert cfg.evaluate is not None
    bs = cfg.evaluate.batch_size
    if isinstance(runner, TorchRunner):
        from distill.config import TeacherConfig
        from distill.teachers import make_teacher

        tcfg = TeacherConfig(backend="transformers", model=name, batch_size=bs, device="cpu")
        return make_teacher(tcfg, model=runner.model, tokenizer=runner.tokenizer)
    return RunnerTeacher(runner, max_new_tokens(cfg), name, batch_size=bs)


def accuracy(runner: Runner, cfg: PipelineConfig, items: list[dict[str, Any]], name: str
             ) -> tuple[float | None, list[dict[str, Any]]]:
    """Held-out accuracy with evaluate's scorer, or None when there is nothing to score."""
    from distill.evaluate.stage import score_model

    if cfg.evaluate is None or not items or all(it.get("answer") is None for it in items):
        return None, []
    ev = cfg.evaluate.model_copy(update={"samples": 1, "max_tokens": max_new_tokens(cfg)})
    scfg = cfg.model_copy(update={"evaluate": ev})
    summary, preds = score_model(name, scorer(runner, cfg, name), scfg, items, None)
    return float(summary["accuracy"]), preds


def latency(runner: Runner, prompts: list[list[dict[str, str]]], max_tokens: int
            ) -> dict[str, Any]:
    """Answer each prompt alone (after one short warm-up); per-answer wall time and tok/s."""
    if prompts:
        runner.chat(prompts[0], min(4, max_tokens))
    times, tokens = [], 0
    for msgs in prompts:
        t0 = time.perf_counter()
        ans = runner.chat(msgs, max_tokens)
        times.append(time.perf_counter() - t0)
        tokens += len(ans.token_ids)
    total = sum(times)
    return {
        "latency_p50_s": round(float(np.percentile(times, 50)), 5) if times else None,
        "latency_p95_s": round(float(np.percentile(times, 95)), 5) if times else None,
        "tokens_per_s": round(tokens / total, 1) if total > 0 else None,
        "latency_prompts": len(times),
        "generated_tokens": tokens,
    }


def measure(load: Callable[[], Runner], cfg: PipelineConfig, items: list[dict[str, Any]],
            name: str) -> tuple[dict[str, Any], list[dict[str, Any]], Runner]:
    """Load, time the latency prompts (peak RSS over both), then score accuracy."""
    assert cfg.export is not None
    n = cfg.export.latency_prompts
    prompts = [prompt_messages(cfg, items[i % len(items)]["question"]) for i in range(n)] \
        if items else []
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        runner = load()
        load_s = time.perf_counter() - t0
        lat = latency(runner, prompts, max_new_tokens(cfg))
    acc, preds = accuracy(runner, cfg, items, name)
    return ({"accuracy": acc, **lat, "peak_mem_mb": mem.delta_mb,
             "load_s": round(load_s, 3)}, preds, runner)


def agreement(runner: Runner, ids: list[int], ref_logits: np.ndarray) -> dict[str, float]:
    """Runner logits vs reference logits [len(ids), vocab]: a prefill, then one cached step."""
    runner.reset()
    pre = runner.forward(ids[:-1])  # all prefill positions, or only the last (llama.cpp)
    step = runner.forward(ids[-1:])
    n = len(ids) - 1
    got = np.concatenate([pre, step])
    want = np.concatenate([ref_logits[n - len(pre): n], ref_logits[-1:]])
    return {"max_abs_diff": float(np.abs(got - want).max()),
            "top1_agreement": round(float((got.argmax(-1) == want.argmax(-1)).mean()), 4)}


def reference_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.asarray(model(input_ids=torch.tensor([ids])).logits[0].float().numpy())


def sample_ids(runner: Runner, cfg: PipelineConfig, items: list[dict[str, Any]]) -> list[int]:
    question = items[0]["question"] if items else "What is 2 + 3?"
    return runner.encode_chat(prompt_messages(cfg, question))


@dataclass
class ForcedSequence:
    """A held-out prompt followed by the fp32 student's own greedy answer, and its fp32 logits."""

    ids: list[int]
    n_prompt: int
    ref_logits: np.ndarray  # [len(ids), vocab], the fp32 model over the whole sequence


def fidelity_sequences(ref: Runner, model: Any, cfg: PipelineConfig,
                       items: list[dict[str, Any]]) -> list[ForcedSequence]:
    """`export.fidelity_prompts` held-out prompts (default 8), each with the reference's greedy
    continuation of at most `export.fidelity_tokens` tokens (default 48, capped by the answer
    length) — the same token ids are fed to every format."""
    e = cfg.export
    assert e is not None
    n = e.fidelity_prompts
    tokens = min(e.fidelity_tokens, max_new_tokens(cfg))
    questions = [it["question"] for it in items[:n]] or ["What is 2 + 3?"]
    out = []
    for q in questions:
        prompt = ref.encode_chat(prompt_messages(cfg, q))
        cont, _ = ref.generate(prompt, tokens)
        ids = prompt + cont
        out.append(ForcedSequence(ids, len(prompt), reference_logits(model, ids)))
    return out


def fidelity(runner: Runner, seqs: list[ForcedSequence]) -> dict[str, Any]:
    """Teacher-forced fidelity to the fp32 student on the answer positions.

    Per sequence: the prompt in one prefill, then the reference's answer one token at a time
    through the runner's KV cache. At every position that predicts an answer token (and the one
    after the last) the runner's top-1 is compared with the fp32 top-1, and |Δlogit| taken over
    the whole vocabulary.
    """
    hits = total = 0
    worst = 0.0
    for s in seqs:
        runner.reset()
        got = [runner.forward(s.ids[:s.n_prompt])[-1]]
        got += [runner.forward([t])[-1] for t in s.ids[s.n_prompt:-1]]
        want = s.ref_logits[s.n_prompt - 1: len(s.ids) - 1]
        g = np.asarray(got)
        hits += int((g.argmax(-1) == want.argmax(-1)).sum())
        total += len(want)
        worst = max(worst, float(np.abs(g - want).max()))
    return {"top1_agreement": round(hits / total, 4) if total else None,
            "max_abs_dlogit": round(worst, 6), "fidelity_positions": total,
            "fidelity_prompts": len(seqs)}
