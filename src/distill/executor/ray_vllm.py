"""`teacher.backend: vllm` on `executor.kind: ray`: a vLLM fleet through Ray Data LLM.

`RayVLLMTeacher` speaks the teacher protocol, so the engine (`run_jobs`) keeps doing what it does
for every backend: cache lookups first (only what the cache lacks is sent), every completion
cached the moment it arrives, the progress bar, cost. What it sends becomes one Ray dataset, one
row per (prompt, sample), run through a `ray.data.llm` vLLM engine processor: chat template,
tokenize, `executor.vllm.replicas` engine actors of `teacher.tensor_parallel_size` GPUs each,
batches of `executor.vllm.batch_size`, detokenize. Outputs stream back to the driver as they
finish and map onto the same `Completion` (hence the same row schema) as the in-process vLLM
backend: text (a `<think>` block split off), token counts, token ids, top-k logprobs.

Ray Data LLM's output has no finish reason: a sample that used all of `max_tokens` is read as
"length", anything shorter as "stop". The driver is the only cache writer here (the fleet returns
results to it), so the run's one `cache.sqlite` serves, as for a local run.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from distill.answers import split_think
from distill.config import PipelineConfig, TeacherConfig
from distill.records import RunDir
from distill.teachers.base import BatchItem, Completion, Job, stream_batch
from distill.teachers.vllm_backend import stable_seed

ERROR_COLUMN = "__inference_error__"


def engine_kwargs(t: TeacherConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The engine arguments the in-process backend passes, plus `executor.vllm.engine_kwargs`."""
    kwargs: dict[str, Any] = {"tensor_parallel_size": t.tensor_parallel_size,
                              "gpu_memory_utilization": t.gpu_memory_utilization,
                              "trust_remote_code": t.trust_remote_code}
    if not t.allow_pickle:  # vLLM's "auto" falls back to .bin/.pt weights (pickle)
        kwargs["load_format"] = "safetensors"
    if t.dtype != "auto":
        kwargs["dtype"] = t.dtype
    if t.top_logprobs:
        kwargs["max_logprobs"] = max(20, t.top_logprobs)
    return kwargs | extra


def processor_config(cfg: PipelineConfig, teacher: TeacherConfig | None = None) -> Any:
    """The `vLLMEngineProcessorConfig` of the fleet (built without vllm installed: only the
    engine actors import it)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    t, v = teacher or cfg.teacher, cfg.executor.vllm
    kwargs: dict[str, Any] = {
        "model_source": t.model, "engine_kwargs": engine_kwargs(t, v.engine_kwargs),
        "batch_size": v.batch_size, "concurrency": (v.replicas, v.replicas),
        "should_continue_on_error": True, "runtime_env": cfg.executor.runtime_env,
    }
    if v.max_concurrent_batches:
        kwargs["max_concurrent_batches"] = v.max_concurrent_batches
    if v.accelerator_type:
        kwargs["accelerator_type"] = v.accelerator_type
    return vLLMEngineProcessorConfig(**kwargs)


def request_row(job: Job, sample: int) -> dict[str, Any]:
    """One dataset row: the chat, vLLM sampling params (a per-sample seed that is the same on
    every run), and what the output mapping needs."""
    p = job.params
    params: dict[str, Any] = {"temperature": p.temperature, "top_p": p.top_p,
                              "max_tokens": p.max_tokens,
                              "seed": stable_seed(p.seed, job.key, sample)}
    if p.top_logprobs:
        params["logprobs"] = p.top_logprobs
    return {"messages": job.messages, "sampling_params": params, "job_key": job.key,
            "job_sample": sample, "max_tokens": p.max_tokens, "top_k": p.top_logprobs}


def top_logprobs(positions: Any, k: int) -> list[list[tuple[int | str, float]]] | None:
    """Per generated token, the k best (token id, logprob): Ray Data LLM gives each position a
    {token id: {"logprob", "rank", "decoded_token"}} dict holding the top-k and the sampled
    token (k + 1 entries when the sampled one is outside the top-k)."""
    if positions is None:
        return None
    steps: list[list[tuple[int | str, float]]] = []
    for position in positions:
        pairs: list[tuple[int | str, float]] = []
        for tid, lp in (position or {}).items():
            value = lp.get("logprob") if isinstance(lp, dict) else getattr(lp, "logprob", lp)
            if value is not None:
                pairs.append((int(tid), float(value)))
        pairs.sort(key=lambda p: -p[1])
        steps.append(pairs[:k])
    return steps


def to_completion(row: dict[str, Any], on_length: str = "keep", latency_s: float = 0.0
                  ) -> Completion:
    """One output row of the vLLM engine processor (`vLLMOutputData` fields beside the
    request's own columns) as a Completion."""
    error = row.get(ERROR_COLUMN)
    if error:
        return Completion.failed("backend", f"vllm: {error}"[:300], latency_s=latency_s)
    tokens = [int(t) for t in (row.get("generated_tokens") or [])]
    n_out = int(row.get("num_generated_tokens") or len(tokens))
    max_tokens = int(row.get("max_tokens") or 0)
    finish = row.get("finish_reason") or ("length" if max_tokens and n_out >= max_tokens
                                          else "stop")
    reasoning, text = split_think(str(row.get("generated_text") or ""))
    comp = Completion(text=text, reasoning=reasoning, finish_reason=finish,
                      prompt_tokens=int(row.get("num_input_tokens") or 0),
                      completion_tokens=n_out, latency_s=latency_s, token_ids=tokens)
    k = int(row.get("top_k") or 0)
    if k:
        comp.top_logprobs = top_logprobs(row.get("logprobs"), k)
    return apply_on_length(comp, on_length)


def apply_on_length(comp: Completion, on_length: str) -> Completion:
    """`teacher.on_length` on a truncated sample: keep it, or drop it (an error row, cached as
    the server's answer). `retry` resamples in the in-process backend only; here it drops."""
    if comp.finish_reason == "length" and not comp.error and on_length != "keep":
        why = "" if on_length == "drop" else "; on_length retry resamples in-process only"
        comp.fail("dropped", f"dropped: finish_reason=length (max_tokens reached{why})")
    return comp


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """On the cluster: the output row as (key, sample, completion JSON), a schema Arrow keeps
    (nested logprob dicts with integer keys are not)."""
    return {"job_key": row["job_key"], "job_sample": int(row["job_sample"]),
            "completion": json.dumps(to_completion(row).to_json())}


def from_output(row: dict[str, Any], on_length: str, latency_s: float) -> Completion:
    """A processor output row on the driver: postprocessed, or an error row (Ray Data LLM
    passes failed rows around postprocess, with the error in `__inference_error__`)."""
    if not row.get("completion"):
        return to_completion(row, on_length, latency_s)
    comp = Completion.from_json(json.loads(row["completion"]))
    comp.latency_s = latency_s
    return apply_on_length(comp, on_length)


class RayVLLMTeacher:
    """The vLLM fleet as a teacher (see the module docstring)."""

    backend = "vllm"

    def __init__(self, cfg: PipelineConfig, teacher: TeacherConfig | None = None) -> None:
        self.pipeline = cfg
        self.cfg = teacher or cfg.teacher
        self.model_id = self.cfg.model
        self.model = self.cfg.model
        self.in_flight = 0

    def processor(self) -> Any:
        from ray.data.llm import build_processor

        template = self.cfg.extra_body.get("chat_template_kwargs")
        builder = {"chat_template_kwargs": template} if isinstance(template, dict) else None
        return build_processor(processor_config(self.pipeline, self.cfg),
                               postprocess=postprocess, builder_kwargs=builder)

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, int, Completion]]:
        items = [request_row(job, s) for job in jobs for s in job.samples]
        if not items:
            return
        import ray.data

        from distill.executor import connect

        connect(self.pipeline.executor)
        by_key = {job.key: job for job in jobs}
        out = self.processor()(ray.data.from_items(items))
        queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()
        stop = threading.Event()

        def pump() -> None:  # the blocking iterator in a thread; the event loop stays live
            try:
                for row in out.iter_rows():
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, row)
            except BaseException as err:  # noqa: BLE001 - re-raised on the event loop
                loop.call_soon_threadsafe(queue.put_nowait, err)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        thread = threading.Thread(target=pump, name="ray-vllm-results", daemon=True)
        started = time.perf_counter()
        self.in_flight = len(items)
        thread.start()
        try:
            n = 0
            while True:
                row = await queue.get()
                if row is done:
                    break
                if isinstance(row, BaseException):
                    raise row
                n += 1
                self.in_flight = len(items) - n
                comp = from_output(row, self.cfg.on_length,
                                   (time.perf_counter() - started) / n)
                yield by_key[row["job_key"]], int(row["job_sample"]), comp
        finally:
            stop.set()
            self.in_flight = 0

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        return stream_batch(self, batch)

    async def aclose(self) -> None:
        return None


def generate_on_fleet(cfg: PipelineConfig, run_dir: RunDir) -> tuple[list[Any], dict[str, Any]]:
    """The generate stage with the fleet as its teacher: the local stage's code (cot, or the
    adaptive rounds, one processor run per round), the run's cache, one driver."""
    from distill.executor.ray_generate import teacher_wrapped
    from distill.generate import adaptive
    from distill.generate.cot import generate_cot
    from distill.seeds import load_seeds

    fleet = RayVLLMTeacher(cfg)
    info = {"executor": {"kind": "ray", "engine": "ray.data.llm vLLM",
                         "replicas": cfg.executor.vllm.replicas,
                         "tensor_parallel_size": cfg.teacher.tensor_parallel_size}}
    if cfg.generate.adaptive is not None:
        with teacher_wrapped(adaptive, lambda _: fleet):
            rows, stats = adaptive.generate_adaptive(cfg, run_dir)
        return rows, stats | info
    rows, stats = generate_cot(cfg, run_dir, fleet, load_seeds(cfg),
                               description="generate (ray vllm)")
    return list(rows), stats | info
