"""The vLLM offline-engine teacher.

Most tests swap in a stand-in `vllm` module (same `LLM.chat` / `SamplingParams` / output shapes
as vLLM's) so the conversion logic runs everywhere; the real-engine test needs vllm and a GPU
and skips cleanly without them.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest

from distill.config import ConfigError, TeacherConfig
from distill.teachers import make_teacher
from distill.teachers.base import Job, SamplingParams
from distill.teachers.engine import run_jobs
from distill.teachers.vllm_backend import VLLM_MISSING, VLLMTeacher, stable_seed, top_logprobs


@dataclass
class Logprob:  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class StubSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class StubLLM:
    """Answers like vLLM: one RequestOutput per conversation, `n` CompletionOutputs each."""

    instances: list[StubLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("data_parallel_size", 1) > 1:
            raise ValueError("LLM(data_parallel_size=2) is not supported for single-process "
                             "usage and may hang.")
        self.kwargs = kwargs
        self.calls: list[tuple[list[Any], list[Any], dict[str, Any]]] = []
        self.truncate_first: set[str] = set()
        StubLLM.instances.append(self)

    def chat(self, messages: list[list[dict[str, str]]], sampling_params: list[Any],
             **kwargs: Any) -> list[Any]:
        self.calls.append((messages, sampling_params, kwargs))
        outputs = []
        for conv, sp in zip(messages, sampling_params, strict=True):
            prompt = conv[-1]["content"]
            if prompt == "too long":
                raise ValueError("prompt is longer than the maximum model length")
            finish = "stop"
            if prompt in self.truncate_first:
                self.truncate_first.discard(prompt)
                finish = "length"
            outs = []
            for i in range(sp.n):
                lp = None
                if sp.logprobs:
                    # k top entries plus the sampled token (id 9, outside the top-k).
                    lp = [{5: Logprob(-0.1, 1), 7: Logprob(-0.9, 2), 6: Logprob(-1.5, 3),
                           9: Logprob(-4.0, 40)} for _ in range(3)]
                outs.append(types.SimpleNamespace(
                    index=i, text=f"<think>step {i}</think>\n\nanswer {prompt} #{i}",
                    token_ids=(11, 12, 13), cumulative_logprob=None, logprobs=lp,
                    finish_reason=finish, stop_reason=None))
            outputs.append(types.SimpleNamespace(prompt="", prompt_token_ids=list(range(7)),
                                                 outputs=outs, finished=True))
        return outputs


@pytest.fixture
def stub_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM = StubLLM  # type: ignore[attr-defined]
    module.SamplingParams = StubSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    StubLLM.instances.clear()
    return module


def vllm_cfg(**kw: Any) -> TeacherConfig:
    return TeacherConfig(**{"backend": "vllm", "model": "org/tiny-chat", **kw})


def make_jobs(prompts: list[str], samples: int = 2, top_logprobs: int = 0) -> list[Job]:
    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=64, seed=3,
                            top_logprobs=top_logprobs)
    return [Job(key=p, messages=[{"role": "user", "content": p}], params=params,
                samples=list(range(samples))) for p in prompts]


def test_chat_outputs_become_completions(stub_vllm: types.ModuleType) -> None:
    cfg = vllm_cfg(tensor_parallel_size=2, gpu_memory_utilization=0.5, trust_remote_code=True,
                   extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    teacher = make_teacher(cfg)
    assert isinstance(teacher, VLLMTeacher)
    jobs = make_jobs(["a", "b", "c"], samples=2, top_logprobs=2)
    results, stats = run_jobs(teacher, jobs, None, show_progress=False)

    llm = StubLLM.instances[0]
    assert llm.kwargs == {"model": "org/tiny-chat", "tensor_parallel_size": 2,
                          "gpu_memory_utilization": 0.5, "trust_remote_code": True, "seed": 0,
                          "load_format": "safetensors"}  # pickle weights only if allow_pickle
    messages, params, kwargs = llm.calls[0]
    assert len(messages) == 3 and kwargs["use_tqdm"] is False
    assert kwargs["chat_template_kwargs"] == {"enable_thinking": True}
    sp = params[0]
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.logprobs) == (2, 0.6, 0.95, 64, 2)
    assert sp.seed == stable_seed(3, "a", 0) and sp.seed != params[1].seed

    assert set(results) == {(p, s) for p in "abc" for s in (0, 1)} and stats.failed == 0
    comp = results[("b", 1)]
    assert comp.text == "answer b #1" and comp.reasoning == "step 1"
    assert comp.finish_reason == "stop" and comp.token_ids == [11, 12, 13]
    assert comp.prompt_tokens == 7 and comp.completion_tokens == 3
    assert comp.top_logprobs == [[(5, -0.1), (7, -0.9)]] * 3


def test_only_missing_samples_are_generated(stub_vllm: types.ModuleType) -> None:
    teacher = VLLMTeacher(vllm_cfg())
    job = make_jobs(["a"], samples=4)[0]
    job.samples = [1, 3]
    results, _ = run_jobs(teacher, [job], None, show_progress=False)
    assert set(results) == {("a", 1), ("a", 3)}
    assert StubLLM.instances[0].calls[0][1][0].n == 2


def test_a_failing_prompt_does_not_sink_its_chunk(stub_vllm: types.ModuleType) -> None:
    teacher = VLLMTeacher(vllm_cfg())
    jobs = make_jobs(["a", "too long", "c"])
    results, stats = run_jobs(teacher, jobs, None, show_progress=False)
    assert stats.failed == 2
    assert results[("too long", 0)].error == (
        "vllm: ValueError: prompt is longer than the maximum model length")
    assert results[("too long", 0)].error_kind == "backend"
    assert results[("a", 1)].text == "answer a #1" and not results[("c", 0)].error


@pytest.mark.parametrize("policy", ["keep", "drop", "retry"])
def test_on_length(stub_vllm: types.ModuleType, policy: str) -> None:
    teacher = VLLMTeacher(vllm_cfg(on_length=policy), chunk_prompts=1)
    teacher._ensure_loaded()
    StubLLM.instances[0].truncate_first = {"a"}
    results, _ = run_jobs(teacher, make_jobs(["a", "b"]), None, show_progress=False)
    a = results[("a", 0)]
    if policy == "keep":
        assert a.finish_reason == "length" and not a.error
    elif policy == "drop":
        assert a.error == "dropped: finish_reason=length (max_tokens reached)"
        assert a.error_kind == "dropped"
    else:
        assert a.finish_reason == "stop" and not a.error
        assert len(StubLLM.instances[0].calls) == 3  # a, b, then a again (resampled)
        assert StubLLM.instances[0].calls[2][1][0].seed != StubLLM.instances[0].calls[0][1][0].seed
    assert not results[("b", 0)].error


def test_data_parallel_unsupported_is_a_config_error(stub_vllm: types.ModuleType) -> None:
    teacher = VLLMTeacher(vllm_cfg(data_parallel_size=2))
    assert teacher.engine_kwargs()["data_parallel_size"] == 2
    with pytest.raises(ConfigError, match="teacher.data_parallel_size"):
        teacher._ensure_loaded()


def test_missing_vllm_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    teacher = VLLMTeacher(vllm_cfg())
    with pytest.raises(ConfigError) as err:
        teacher._ensure_loaded()
    assert str(err.value) == VLLM_MISSING
    assert VLLM_MISSING == ("teacher.backend: vllm is not installed; pip install -e '.[vllm]' "
                            "(needs a CUDA GPU)")


def test_top_logprobs_accepts_flat_sequences() -> None:
    class Flat:  # FlatLogprobs iterates as one {token_id: Logprob} dict per position
        def __iter__(self) -> Any:
            yield {3: Logprob(-0.2), 4: Logprob(-0.1)}
            yield {}

    assert top_logprobs(Flat(), 1) == [[(4, -0.1)], []]
    assert top_logprobs(None, 3) is None


# the real engine -----------------------------------------------------------------------------
@pytest.mark.gpu
def test_real_vllm_engine() -> None:
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    model = os.environ.get("DISTILL_VLLM_TEST_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    teacher = VLLMTeacher(vllm_cfg(model=model, gpu_memory_utilization=0.3))
    jobs = make_jobs(["What is 2 + 3? Answer with a number.", "Name a colour."], samples=2,
                     top_logprobs=3)
    try:
        results, stats = run_jobs(teacher, jobs, None, show_progress=False)
    finally:
        teacher.shutdown()
    assert stats.failed == 0 and len(results) == 4
    for comp in results.values():
        assert comp.text and comp.completion_tokens == len(comp.token_ids or [])
        assert comp.top_logprobs and all(len(step) == 3 for step in comp.top_logprobs)
        assert comp.finish_reason in ("stop", "length")


def test_generate_batch_is_the_stream_in_batch_order(stub_vllm: types.ModuleType) -> None:
    teacher = VLLMTeacher(vllm_cfg())
    jobs = make_jobs(["a", "b"], samples=2)
    comps = teacher.generate_batch([(jobs[1], 1), (jobs[0], 0), (jobs[1], 0)])
    assert [c.text for c in comps] == ["answer b #1", "answer a #0", "answer b #0"]


def test_vllm_loads_safetensors_only_unless_allow_pickle(stub_vllm: types.ModuleType) -> None:
    from distill.executor.ray_vllm import engine_kwargs

    assert VLLMTeacher(vllm_cfg()).engine_kwargs()["load_format"] == "safetensors"
    assert "load_format" not in VLLMTeacher(vllm_cfg(allow_pickle=True)).engine_kwargs()
    assert engine_kwargs(vllm_cfg(), {})["load_format"] == "safetensors"
    assert "load_format" not in engine_kwargs(vllm_cfg(allow_pickle=True), {})
