"""The evaluate stage on Ray: each model's held-out items split into shards, one task each.

The stage hands each model to `on_ray` (`evaluate.stage.on_executor`), which returns a teacher
of the same identity (backend, model id: the same cache keys) whose `stream` runs the jobs it
is given as Ray tasks, the items split as generate splits seeds (contiguous by item index,
`shard_ranges`; an item's greedy and sampled answers stay in one shard). Each task rebuilds the
model on its worker: an API teacher from its config, a model directory from its path (on the
shared filesystem), an in-memory model (the base student) shipped once through the object
store. The driver keeps everything else: the run's cache (the teacher's answers), the grading,
the metrics. (Export scores its artifacts locally: it calls `score_model` directly.)

A `vllm` teacher goes to the vLLM fleet (`ray_vllm.RayVLLMTeacher`) instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from distill.config import PipelineConfig, TeacherConfig
from distill.executor import connect, shard_ranges, unwrap_task_error
from distill.teachers.base import BatchItem, Completion, Job, stream_batch


def on_ray(cfg: PipelineConfig, teacher: Any, item_of: Callable[[str], str] = str) -> Any:
    """`teacher` as Ray shards (`item_of`: the item a job key belongs to)."""
    backend = getattr(teacher, "backend", None)
    if backend == "vllm":
        from distill.executor.ray_vllm import RayVLLMTeacher

        return RayVLLMTeacher(cfg, teacher.cfg)
    if backend in ("openai", "transformers") and isinstance(getattr(teacher, "cfg", None),
                                                           TeacherConfig):
        return ShardedTeacher(cfg, teacher, item_of)
    return teacher  # nothing a worker could rebuild it from: answered here


def build_teacher(tcfg: TeacherConfig, shipped: Any) -> Any:
    """The model on the worker: the shipped (model, tokenizer), else from its config."""
    from distill.teachers import make_teacher

    if shipped is not None:
        model, tokenizer = shipped
        return make_teacher(tcfg, model=model, tokenizer=tokenizer)
    return make_teacher(tcfg)


def answer_shard(tcfg: TeacherConfig, shipped: Any, jobs: list[Job]
                 ) -> list[tuple[str, int, dict[str, Any]]]:
    """On a worker: every (job, sample) answered, as (key, sample, completion JSON)."""
    from distill.teachers.engine import run_jobs

    results, _ = run_jobs(build_teacher(tcfg, shipped), jobs, None, show_progress=False)
    return [(key, s, comp.to_json()) for (key, s), comp in results.items()]


class ShardedTeacher:
    """A teacher whose answers come from Ray tasks, one per shard of items."""

    def __init__(self, cfg: PipelineConfig, teacher: Any, item_of: Callable[[str], str]) -> None:
        self.pipeline, self.inner, self.item_of = cfg, teacher, item_of
        self.backend = teacher.backend
        self.model_id = getattr(teacher, "model_id", getattr(teacher, "model", ""))
        self.cfg: TeacherConfig = teacher.cfg
        self.in_flight = 0

    def worker_config(self) -> TeacherConfig:
        """A local model asked a GPU of Ray (`executor.gpus_per_shard`) runs on it."""
        ex = self.pipeline.executor
        if self.backend == "transformers" and ex.gpus_per_shard and self.cfg.device == "cpu":
            return self.cfg.model_copy(update={"device": "auto"})
        return self.cfg

    def shards(self, jobs: Sequence[Job]) -> list[list[Job]]:
        """Jobs grouped by item, items in order of first appearance, cut in contiguous runs."""
        items: dict[str, list[Job]] = {}
        for job in jobs:
            items.setdefault(self.item_of(job.key), []).append(job)
        groups = list(items.values())
        return [[job for g in groups[a:b] for job in g]
                for a, b in shard_ranges(len(groups), self.pipeline.executor.shards)]

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, int, Completion]]:
        todo = [job for job in jobs if job.samples]
        if not todo:
            return
        ex = self.pipeline.executor
        ray = connect(ex)
        model = getattr(self.inner, "model", None)
        shipped = None
        if self.backend == "transformers" and model is not None and not isinstance(model, str):
            shipped = ray.put((model, self.inner.tokenizer))
        task = ray.remote(answer_shard).options(
            max_retries=ex.max_retries, retry_exceptions=False, num_cpus=ex.cpus_per_shard,
            num_gpus=ex.gpus_per_shard)
        by_key = {job.key: job for job in todo}
        tcfg = self.worker_config()
        pending = [task.remote(tcfg, shipped, shard) for shard in self.shards(todo)]
        self.in_flight = sum(len(j.samples) for j in todo)
        try:
            while pending:
                ready, pending = await asyncio.to_thread(ray.wait, pending, num_returns=1)
                for key, s, data in ray.get(ready[0]):
                    self.in_flight -= 1
                    yield by_key[key], s, Completion.from_json(data)
        except BaseException as err:
            for ref in pending:
                ray.cancel(ref)
            raise unwrap_task_error(err) from None
        finally:
            self.in_flight = 0

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        return stream_batch(self, batch)

    async def aclose(self) -> None:
        await self.inner.aclose()
