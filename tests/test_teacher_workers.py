"""`teacher.workers`: the local transformers teacher generating in several CPU processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError, TeacherConfig
from distill.teachers.base import Job, SamplingParams
from distill.teachers.transformers_backend import TransformersTeacher
from tests.conftest import MICRO_SEEDS


def _jobs() -> list[Job]:
    params = SamplingParams(temperature=0.7, max_tokens=24, seed=3, top_logprobs=3)
    return [Job(key=f"{s['id']}-{r}", params=params, samples=[0, 1],
                messages=[{"role": "user", "content": s["question"]}])
            for r in range(2) for s in MICRO_SEEDS]


def _collect(cfg: TeacherConfig, jobs: list[Job]) -> dict[tuple[str, int], object]:
    async def go() -> dict[tuple[str, int], object]:
        teacher = TransformersTeacher(cfg)
        try:
            return {(job.key, s): comp async for job, s, comp in teacher.stream(jobs)}
        finally:
            await teacher.aclose()
    return asyncio.run(go())


def test_workers_return_every_sample_with_the_text_one_process_gives(tiny_teacher: Path) -> None:
    cfg = TeacherConfig(backend="transformers", model=str(tiny_teacher), device="cpu",
                        dtype="float32", batch_size=5)
    jobs = _jobs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of two workers on a 2-core machine gets
    try:
        one = _collect(cfg, jobs)
    finally:
        torch.set_num_threads(threads)
    two = _collect(cfg.model_copy(update={"workers": 2}), jobs)
    assert set(two) == set(one) and len(one) == 2 * len(jobs)
    for key, a in one.items():
        b = two[key]
        assert b.error is None and a.error is None
        assert (b.text, b.token_ids) == (a.text, a.token_ids)
        assert len(b.top_logprobs) == len(b.token_ids) > 0


def test_workers_need_the_local_cpu_backend() -> None:
    with pytest.raises(ValueError, match="workers > 1 needs backend: transformers"):
        TeacherConfig(backend="openai", model="m", workers=2)
    with pytest.raises(ValueError, match="device: cpu"):
        TeacherConfig(backend="transformers", model="m", device="cuda", workers=2)


def test_a_bad_model_dir_fails_before_any_worker_starts(tmp_path: Path) -> None:
    cfg = TeacherConfig(backend="transformers", model=str(tmp_path), device="cpu", workers=2)
    with pytest.raises(ConfigError, match="no config.json"):
        _collect(cfg, _jobs()[:1])


def test_generate_batch_keeps_the_order_across_sampling_params(tiny_teacher: Path) -> None:
    """One `generate` per sampling parameters, the completions back in the batch's order."""
    cfg = TeacherConfig(backend="transformers", model=str(tiny_teacher), device="cpu",
                        dtype="float32")
    hot = SamplingParams(temperature=0.7, max_tokens=12, seed=3, top_logprobs=2)
    cold = SamplingParams(temperature=0.0, max_tokens=6, seed=3)
    jobs = [Job(key=s["id"], params=hot if i % 2 else cold, samples=[0],
                messages=[{"role": "user", "content": s["question"]}])
            for i, s in enumerate(MICRO_SEEDS[:4])]
    teacher = TransformersTeacher(cfg)
    mixed = teacher.generate_batch([(j, 0) for j in jobs])
    alone = {id(j): c for group in (jobs[0::2], jobs[1::2])
             for j, c in zip(group, teacher.generate_batch([(j, 0) for j in group]), strict=True)}
    assert [(c.text, c.token_ids) for c in mixed] == [
        (alone[id(j)].text, alone[id(j)].token_ids) for j in jobs]
    assert [c.top_logprobs is not None for c in mixed] == [False, True, False, True]
    assert all(c.completion_tokens <= j.params.max_tokens for c, j in zip(mixed, jobs,
                                                                          strict=True))
