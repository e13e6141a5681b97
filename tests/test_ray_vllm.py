"""`teacher.backend: vllm` on `executor.kind: ray` (Ray Data LLM): what runs on CPU.

The output mapping is checked on rows shaped as Ray Data LLM's vLLM stage writes them
(`vLLMOutputData` plus the request's columns) against the in-process backend's mapping of the
same engine output; the processor config is built from the pipeline (no vllm needed); the
dataset plumbing (request columns through Arrow, results streamed into the engine and the cache)
runs with a CPU stand-in for the engine stage. The real fleet needs vllm and a GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_fixture import ray_cluster, sum_config  # noqa: E402

from distill.config import PipelineConfig  # noqa: E402
from distill.executor import ray_vllm  # noqa: E402
from distill.generate.cot import build_jobs, generation_row  # noqa: E402
from distill.pipeline import run_stage  # noqa: E402
from distill.records import RunDir, read_jsonl  # noqa: E402
from distill.teachers.vllm_backend import to_completions  # noqa: E402
from tests.projects import write_sum_project  # noqa: E402

__all__ = ["ray_cluster"]
pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]


def vllm_config(root: Path, **executor: Any) -> PipelineConfig:
    cfg = sum_config(root, "unused", executor={"kind": "ray"} | executor, samples=2,
                     top_logprobs=3)
    cfg.teacher = cfg.teacher.model_copy(update={"backend": "vllm", "base_url": None,
                                                 "model": str(ROOT / "data/models/demo-teacher")})
    return cfg


def engine_output(text: str, tokens: list[int], prompt_len: int, k: int) -> dict[str, Any]:
    """The fields Ray Data LLM's vLLM stage adds to a row (`vLLMOutputData.model_dump()`):
    per position, {token id: {logprob, rank, decoded_token}} with the sampled token beside the
    top-k (k + 1 entries when it is outside them)."""
    logprobs = []
    for pos, tok in enumerate(tokens):
        entry = {tok: {"logprob": -2.5 - pos, "rank": k + 1, "decoded_token": "x"}}
        entry |= {100 + j: {"logprob": -0.1 * (j + 1), "rank": j + 1, "decoded_token": f"t{j}"}
                  for j in range(k)}
        logprobs.append(entry)
    return {"prompt": "<prompt>", "prompt_token_ids": list(range(prompt_len)),
            "num_input_tokens": prompt_len, "generated_tokens": tokens,
            "generated_text": text, "num_generated_tokens": len(tokens),
            "embeddings": None, "metrics": {"arrival_time": 0.0}, "logprobs": logprobs,
            "prompt_logprobs": None}


def in_process(text: str, tokens: list[int], prompt_len: int, k: int, finish: str) -> Any:
    """The same engine output as vLLM's `RequestOutput` (what the in-process backend reads)."""
    logprobs = [{tid: SimpleNamespace(logprob=v["logprob"]) for tid, v in pos.items()}
                for pos in engine_output(text, tokens, prompt_len, k)["logprobs"]]
    out = SimpleNamespace(index=0, text=text, token_ids=tokens, finish_reason=finish,
                          logprobs=logprobs)
    return SimpleNamespace(prompt_token_ids=list(range(prompt_len)), outputs=[out])


def test_fleet_rows_are_the_in_process_backends_rows(tmp_path: Path) -> None:
    write_sum_project(tmp_path, 1)
    cfg = vllm_config(tmp_path)
    seed = {"id": "s0", "question": "What is 0 + 1?", "answer": "1"}
    (job,) = build_jobs(cfg, [seed])
    max_tokens = job.params.max_tokens
    cases = [("<think>0 plus 1</think>So 0 + 1 = 1. The answer is 1.", [5, 6, 7], "stop"),
             ("0 + 1 is" + " one" * 20, list(range(10, 10 + max_tokens)), "length")]
    for text, tokens, finish in cases:
        row = ray_vllm.request_row(job, 1) | engine_output(text, tokens, 9, 3)
        out = ray_vllm.postprocess(row)
        assert set(out) == {"job_key", "job_sample", "completion"}
        json.dumps(out)  # what Arrow carries back: plain JSON
        comp = ray_vllm.from_output(out, "keep", latency_s=0.25)
        (ref,) = to_completions(in_process(text, tokens, 9, 3, finish), 1, 3, 0.25)
        fleet_row = generation_row(cfg, seed, job, 1, comp)
        assert fleet_row == generation_row(cfg, seed, job, 1, ref)
        assert fleet_row["finish_reason"] == finish
        assert fleet_row["prompt_tokens"] == 9 and fleet_row["completion_tokens"] == len(tokens)
        assert fleet_row["token_ids"] == tokens
        assert [len(p) for p in fleet_row["top_logprobs"]] == [3] * len(tokens)
        assert fleet_row["top_logprobs"][0][0] == (100, pytest.approx(-0.1))  # best first
    assert comp.error is None
    assert generation_row(cfg, seed, job, 1, comp)["reasoning"] is None
    first = ray_vllm.from_output(ray_vllm.postprocess(ray_vllm.request_row(job, 0) | engine_output(
        cases[0][0], cases[0][1], 9, 3)), "keep", 0.0)
    assert first.reasoning == "0 plus 1" and first.text.startswith("So 0 + 1 = 1")


def test_fleet_errors_and_truncation_policies_become_error_rows(tmp_path: Path) -> None:
    write_sum_project(tmp_path, 1)
    cfg = vllm_config(tmp_path)
    (job,) = build_jobs(cfg, [{"id": "s0", "question": "What is 0 + 1?", "answer": "1"}])
    failed = ray_vllm.request_row(job, 0) | {ray_vllm.ERROR_COLUMN: "CUDA out of memory"}
    comp = ray_vllm.from_output(failed, "keep", 0.0)  # error rows skip postprocess
    assert comp.error == "vllm: CUDA out of memory" and comp.error_kind == "backend"
    long = ray_vllm.request_row(job, 0) | engine_output(
        "x", list(range(job.params.max_tokens)), 4, 0)
    kept = ray_vllm.from_output(ray_vllm.postprocess(long), "keep", 0.0)
    assert kept.finish_reason == "length" and kept.error is None
    for policy in ("drop", "retry"):
        dropped = ray_vllm.from_output(ray_vllm.postprocess(long), policy, 0.0)
        assert dropped.error is not None and dropped.error_kind == "dropped"  # cached
    arrow_keys = ray_vllm.top_logprobs([{"7": {"logprob": -1.0}, "9": {"logprob": -0.5}}], 1)
    assert arrow_keys == [[(9, -0.5)]]  # token ids as strings (a round trip through JSON)


def test_processor_config_comes_from_the_teacher_and_the_executor(tmp_path: Path) -> None:
    pytest.importorskip("ray.data.llm", reason="ray.data.llm does not import here")
    write_sum_project(tmp_path, 1)
    cfg = vllm_config(tmp_path, vllm={"replicas": 3, "batch_size": 16,
                                      "accelerator_type": "H100",
                                      "engine_kwargs": {"max_model_len": 2048}})
    cfg.teacher = cfg.teacher.model_copy(update={"tensor_parallel_size": 2, "dtype": "bfloat16",
                                                 "gpu_memory_utilization": 0.8})
    pc = ray_vllm.processor_config(cfg)
    assert pc.model_source == cfg.teacher.model
    assert pc.concurrency == (3, 3) and pc.batch_size == 16 and pc.accelerator_type == "H100"
    assert pc.should_continue_on_error is True
    for key, value in {"tensor_parallel_size": 2, "dtype": "bfloat16", "max_model_len": 2048,
                       "gpu_memory_utilization": 0.8, "max_logprobs": 20}.items():
        assert pc.engine_kwargs[key] == value, key


def test_processor_builds_without_vllm(ray_cluster: Any, tmp_path: Path) -> None:
    pytest.importorskip("ray.data.llm", reason="ray.data.llm does not import here")
    write_sum_project(tmp_path, 1)
    cfg = vllm_config(tmp_path, vllm={"replicas": 2, "batch_size": 8})
    cfg.teacher.extra_body = {"chat_template_kwargs": {"enable_thinking": False}}
    processor = ray_vllm.RayVLLMTeacher(cfg).processor()
    assert list(processor.stages) == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage",
                                      "DetokenizeStage"]
    engine = processor.stages["vLLMEngineStage"]
    assert engine.map_batches_kwargs["compute"].min_size == 2
    assert engine.map_batches_kwargs["compute"].max_size == 2
    assert engine.fn_constructor_kwargs["batch_size"] == 8
    template = processor.stages["ChatTemplateStage"].fn_constructor_kwargs
    assert template["chat_template_kwargs"] == {"enable_thinking": False}


def stand_in_engine(row: dict[str, Any]) -> dict[str, Any]:
    """CPU stand-in for the chat-template -> vLLM -> detokenize stages: the request's columns
    (after Arrow) in, `vLLMOutputData` fields out."""
    params = row["sampling_params"]
    question = row["messages"][-1]["content"]
    i = int(question.split()[2])
    text = f"{i} + 1 = {i + 1}. The answer is {i + 1}. seed={params['seed']}"
    tokens = list(range(3 + i % 2))
    return row | engine_output(text, tokens, 7, int(params.get("logprobs") or 0))


def test_generate_on_the_fleet_streams_into_the_cache(ray_cluster: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_sum_project(tmp_path, 6)
    cfg = vllm_config(tmp_path)
    monkeypatch.setattr(ray_vllm.RayVLLMTeacher, "processor", lambda self: (
        lambda ds: ds.map(stand_in_engine).map(ray_vllm.postprocess)))
    entry = run_stage("generate", cfg, RunDir(tmp_path / "run"))
    rows = read_jsonl(tmp_path / "run" / "generate" / "generations.jsonl")
    assert [(r["seed_id"], r["sample"]) for r in rows] == [
        (f"s{i}", s) for i in range(6) for s in range(2)]
    assert all(r["answer"] == r["gold"] for r in rows)
    assert len({r["response"] for r in rows}) == 12  # a seed per sample
    assert all(len(r["top_logprobs"]) == len(r["token_ids"]) for r in rows)
    assert entry["sent"] == 12 and entry["executor"]["engine"] == "ray.data.llm vLLM"
    again = run_stage("generate", cfg, RunDir(tmp_path / "run"), force=True)
    assert again["sent"] == 0 and again["cached"] == 12  # the run's cache answered


@pytest.mark.gpu
def test_real_fleet_generates(ray_cluster: Any, tmp_path: Path) -> None:
    """The real thing: vLLM engine actors on a GPU (skipped without vllm or CUDA)."""
    pytest.importorskip("vllm", reason="vllm is not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    write_sum_project(tmp_path, 8)
    cfg = vllm_config(tmp_path)
    entry = run_stage("generate", cfg, RunDir(tmp_path / "run"))
    rows = read_jsonl(tmp_path / "run" / "generate" / "generations.jsonl")
    assert entry["rows"] == 16 and entry["errors"] == 0
    assert all(r["response"] and r["completion_tokens"] > 0 for r in rows)
    assert all(r["top_logprobs"] and len(r["top_logprobs"][0]) == 3 for r in rows)
