"""vLLM's offline engine (`vllm.LLM`) as a teacher: the fastest way to sample a local model on GPUs.

Prompts go to `LLM.chat` in chunks (vLLM schedules and batches inside a chunk), each prompt with
`n` = the samples it still needs, in a worker thread so the event loop and the progress bar stay
live. Results stream out chunk by chunk, so a crash loses at most one chunk's work. The engine
is loaded once and kept across runs; `shutdown()` frees the GPU.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from distill.answers import split_think
from distill.config import ConfigError, TeacherConfig
from distill.teachers.base import BatchItem, Completion, Job, Result, TopLogprobs, stream_batch

VLLM_MISSING = ("teacher.backend: vllm is not installed; pip install -e '.[vllm]' "
                "(needs a CUDA GPU)")


def stable_seed(seed: int, key: str, sample: int) -> int:
    """A per-request seed that is the same on every run (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(VLLM_MISSING) from err
    return vllm


class VLLMTeacher:
    backend = "vllm"

    def __init__(self, cfg: TeacherConfig, *, llm: Any = None, chunk_prompts: int = 512) -> None:
        if not cfg.model:
            raise ConfigError("teacher.model: empty; expected a model directory or hub id")
        self.cfg = cfg
        self.model_id = cfg.model
        self.llm = llm
        self.chunk_prompts = max(1, chunk_prompts)
        self.in_flight = 0

    def engine_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        kwargs: dict[str, Any] = {
            "model": cfg.model,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "trust_remote_code": cfg.trust_remote_code,
            "seed": 0,
        }
        if not cfg.allow_pickle:  # vLLM's "auto" falls back to .bin/.pt weights (pickle)
            kwargs["load_format"] = "safetensors"
        if cfg.dtype != "auto":
            kwargs["dtype"] = cfg.dtype
        if cfg.data_parallel_size > 1:
            kwargs["data_parallel_size"] = cfg.data_parallel_size
        return kwargs

    def _ensure_loaded(self) -> Any:
        if self.llm is None:
            vllm = _import_vllm()
            try:
                self.llm = vllm.LLM(**self.engine_kwargs())
            except (TypeError, ValueError) as err:
                if self.cfg.data_parallel_size > 1 and "data_parallel" in str(err):
                    raise ConfigError(
                        "teacher.data_parallel_size: this vLLM's offline LLM does not run "
                        "data parallel in one process; serve replicas with `vllm serve` and "
                        "use backend: openai with a list of base_url") from err
                raise
        return self.llm

    def _sampling_params(self, job: Job, samples: list[int], round_: int) -> Any:
        vllm = _import_vllm()
        p = job.params
        return vllm.SamplingParams(
            n=len(samples),
            seed=stable_seed(p.seed + 7919 * round_, job.key, samples[0]),
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            logprobs=p.top_logprobs or None,
        )

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[Result]:
        pending = [(job, list(job.samples)) for job in jobs if job.samples]
        if not pending:
            return
        await asyncio.to_thread(self._ensure_loaded)
        retry_rounds = self.cfg.max_retries if self.cfg.on_length == "retry" else 0
        for round_ in range(retry_rounds + 1):
            last = round_ == retry_rounds
            truncated: list[tuple[Job, list[int]]] = []
            for start in range(0, len(pending), self.chunk_prompts):
                chunk = pending[start : start + self.chunk_prompts]
                results = await self._run_chunk(chunk, round_)
                for job, samples, comps in results:
                    again: list[int] = []
                    for s, comp in zip(samples, comps, strict=True):
                        if comp.finish_reason == "length" and not comp.error:
                            kept = self._on_length(comp, last)
                            if kept is None:
                                again.append(s)
                                continue
                        yield job, s, comp
                    if again:
                        truncated.append((job, again))
            pending = truncated
            if not pending:
                return

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        return stream_batch(self, batch)

    def _on_length(self, comp: Completion, last_round: bool) -> Completion | None:
        """Apply `on_length` to `comp` (in place); None means "sample it again"."""
        policy = self.cfg.on_length
        if policy == "keep":
            return comp
        if policy == "retry" and not last_round:
            return None
        if policy == "drop":
            comp.fail("dropped", "dropped: finish_reason=length (max_tokens reached)")
        else:
            comp.fail("length", "still truncated after retries: finish_reason=length "
                      "(max_tokens reached)")
        return comp

    async def _run_chunk(self, chunk: list[tuple[Job, list[int]]], round_: int
                         ) -> list[tuple[Job, list[int], list[Completion]]]:
        self.in_flight = sum(len(s) for _, s in chunk)
        try:
            try:
                comps = await asyncio.to_thread(self._generate, chunk, round_)
                return [(job, s, c) for (job, s), c in zip(chunk, comps, strict=True)]
            except Exception as err:  # noqa: BLE001 - isolate the prompt that broke the chunk
                if len(chunk) == 1:
                    job, samples = chunk[0]
                    msg = f"vllm: {type(err).__name__}: {err}"[:300]
                    return [(job, samples, [Completion.failed("backend", msg) for _ in samples])]
            # One bad prompt (too long for max_model_len, say) fails the whole call: retry
            # the chunk prompt by prompt so only that prompt ends as an error row.
            out: list[tuple[Job, list[int], list[Completion]]] = []
            for item in chunk:
                out += await self._run_chunk([item], round_)
            return out
        finally:
            self.in_flight = 0

    def _generate(self, chunk: list[tuple[Job, list[int]]], round_: int) -> list[list[Completion]]:
        llm = self._ensure_loaded()
        conversations = [job.messages for job, _ in chunk]
        params = [self._sampling_params(job, samples, round_) for job, samples in chunk]
        kwargs: dict[str, Any] = {"use_tqdm": False}
        template_kwargs = self.cfg.extra_body.get("chat_template_kwargs")
        if isinstance(template_kwargs, dict):
            kwargs["chat_template_kwargs"] = template_kwargs
        t0 = time.perf_counter()
        outputs = llm.chat(conversations, params, **kwargs)
        n_samples = max(1, sum(len(s) for _, s in chunk))
        latency = (time.perf_counter() - t0) / n_samples
        return [to_completions(out, len(samples), job.params.top_logprobs, latency)
                for (job, samples), out in zip(chunk, outputs, strict=True)]

    async def aclose(self) -> None:
        """Keep the engine: reloading weights between runs costs minutes. See `shutdown()`."""
        return None

    def shutdown(self) -> None:
        """Drop the engine so its GPU memory can be reclaimed."""
        self.llm = None
        try:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def to_completions(output: Any, n: int, top_k: int, latency: float) -> list[Completion]:
    """A vLLM `RequestOutput` as `n` Completions (error rows for any missing sample)."""
    prompt_tokens = len(getattr(output, "prompt_token_ids", None) or [])
    outs = sorted(getattr(output, "outputs", None) or [], key=lambda o: getattr(o, "index", 0))
    comps: list[Completion] = []
    for i in range(n):
        if i >= len(outs):
            comps.append(Completion.failed("empty", f"vllm returned {len(outs)} of {n} samples",
                                           prompt_tokens=prompt_tokens))
            continue
        o = outs[i]
        token_ids = [int(t) for t in (getattr(o, "token_ids", None) or [])]
        reasoning, text = split_think(getattr(o, "text", "") or "")
        finish = getattr(o, "finish_reason", None)
        comp = Completion(text=text, reasoning=reasoning, finish_reason=finish,
                          prompt_tokens=prompt_tokens, completion_tokens=len(token_ids),
                          latency_s=latency, token_ids=token_ids)
        if finish == "abort":
            comp.fail("backend", "vllm: request aborted")
        if top_k > 0:
            comp.top_logprobs = top_logprobs(getattr(o, "logprobs", None), top_k)
        comps.append(comp)
    return comps


def top_logprobs(logprobs: Any, k: int) -> TopLogprobs | None:
    """Per position, the top-k (token id, logprob) pairs.

    vLLM gives each position a {token_id: Logprob} dict holding the top-k *and* the sampled
    token (k + 1 entries when the sampled token is outside the top-k); keep the k best.
    `FlatLogprobs` (newer vLLM) iterates the same way.
    """
    if logprobs is None:
        return None
    steps: TopLogprobs = []
    for position in logprobs:
        pairs: list[tuple[int | str, float]] = [
            (int(tid), float(getattr(lp, "logprob", lp))) for tid, lp in (position or {}).items()]
        pairs.sort(key=lambda p: -p[1])
        steps.append(list(pairs[:k]))
    return steps
