"""The openai teacher against a real OpenAI-compatible server nobody here wrote: `transformers
serve` (the `serving` extra of transformers) serving the real SmolLM2-135M-Instruct on CPU.

What that server does with a chat completion request (transformers 5.24, read from
`transformers/cli/serving/chat_completion.py`): `n`, `logprobs` and `top_logprobs` are ignored
with a server-side warning and a 200 answer (one choice, no `logprobs`); `temperature` is only
used when the model's generation config samples (SmolLM2's says `do_sample: false`, so every
answer is greedy), which no client can see in a response. The teacher must notice the first two:
samples are requested one by one, and a run whose KD training needs the logprobs stops after the
first responses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from distill.config import ConfigError, PipelineConfig, TeacherConfig
from distill.teachers import make_teacher
from distill.teachers.base import Job, SamplingParams
from distill.teachers.engine import run_jobs

pytestmark = [pytest.mark.real, pytest.mark.timeout(240)]

START_TIMEOUT_S = 120.0
SERVE = ("import sys; from transformers.cli.transformers import main; "
         "sys.argv[0] = 'transformers'; sys.exit(main())")


@dataclass
class Served:
    url: str
    model: str
    log: Path

    def chat_posts(self) -> int:
        """Chat completion requests the server answered (its access log)."""
        return self.log.read_text().count('"POST /v1/chat/completions HTTP/1.1"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200 and json.load(resp).get("status") == "ok"
    except OSError:
        return False


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(url):
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited ({proc.returncode}):\n"
                        f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"transformers serve not ready after {START_TIMEOUT_S:g}s:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.25)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


@pytest.fixture(scope="module")
def served(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`transformers serve <model dir>` on 127.0.0.1, CPU only, offline; stopped afterwards."""
    pytest.importorskip("fastapi", reason="transformers[serving] is not installed")
    pytest.importorskip("uvicorn", reason="transformers[serving] is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
                        "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SERVE, "serve", str(real_model), "--device", "cpu",
           "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log)
        yield Served(url=f"{url}/v1", model=str(real_model), log=log)
    finally:
        stop(proc)


def teacher_cfg(served: Served, **kw: Any) -> TeacherConfig:
    base: dict[str, Any] = dict(backend="openai", model=served.model, base_url=served.url,
                                api_key_env=None, max_concurrency=2, timeout_s=120.0,
                                max_retries=1)
    return TeacherConfig(**(base | kw))


def prompt_tokens(model_dir: str, messages: list[dict[str, str]]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)
    return len(enc["input_ids"])


def test_completions_usage_and_finish_reasons(served: Served) -> None:
    short = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    jobs = [Job(key="stop", messages=short, params=SamplingParams(temperature=0.0, max_tokens=24),
                samples=[0]),
            Job(key="length", messages=story, params=SamplingParams(temperature=0.0, max_tokens=4),
                samples=[0]),
            Job(key="n", messages=short, params=SamplingParams(temperature=0.7, max_tokens=24),
                samples=[0, 1])]
    teacher = make_teacher(teacher_cfg(served))
    results, stats = run_jobs(teacher, jobs, None, show_progress=False)
    assert stats.failed == 0, {k: c.error for k, c in results.items()}
    stop, length = results[("stop", 0)], results[("length", 0)]
    assert "5" in stop.text and stop.finish_reason == "stop"
    assert 0 < stop.completion_tokens < 24
    assert length.text and length.finish_reason == "length" and length.completion_tokens == 4
    assert stop.prompt_tokens == prompt_tokens(served.model, short)
    assert length.prompt_tokens == prompt_tokens(served.model, story)
    assert "usage_estimated" not in stop.extra  # the server's own usage, not a guess
    # n = 2 came back as one choice: noticed, and the second sample was asked for on its own.
    assert not teacher.n_supported
    samples = [results[("n", s)] for s in (0, 1)]
    assert all(c.text and c.error is None for c in samples)
    assert served.chat_posts() == 4
    # The server ignores temperature 0.7 too (greedy generation config): both samples are the
    # greedy answer. Nothing in a response says so; this pins what the module docstring states.
    assert samples[0].text == samples[1].text == stop.text


def test_generate_with_kd_stops_after_first_response(served: Served, tmp_path: Path) -> None:
    from distill.pipeline import run_stage
    from distill.records import RunDir

    (tmp_path / "seeds.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "question": f"What is {i} + 2?", "answer": str(i + 2)}) + "\n"
        for i in range(8)))
    (tmp_path / "p.j2").write_text("{{ question }} Answer with the number only.")
    cfg = PipelineConfig.model_validate({
        "name": "serve-kd", "root": str(tmp_path), "seeds": {"path": "seeds.jsonl"},
        "teacher": teacher_cfg(served, max_concurrency=1, top_logprobs=5).model_dump(),
        "generate": {"prompt": "p.j2", "max_tokens": 8, "temperature": 0.0},
        "train": {"method": "kd"},
    })
    before = served.chat_posts()
    run_dir = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^teacher\.top_logprobs: 5, but the openai teacher at "
                                          r"http://127\.0\.0\.1:\d+/v1 returned no logprobs "
                                          r"\(1 of 1 responses.*train\.method kd needs them"):
        run_stage("generate", cfg, run_dir)
    assert served.chat_posts() - before == 1  # 8 prompts wanted, one sent
    entry = run_dir.manifest()["stages"]["generate"]
    assert entry["status"] == "failed" and entry["error"] == "bad input"
