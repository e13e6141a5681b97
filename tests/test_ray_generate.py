"""generate on Ray (`executor.kind: ray`) against the loopback teacher and a 2-CPU local cluster:
the same rows as a local run, finished shards skipped on a rerun, a killed worker retried
without duplicates, a killed driver rerun resending at most what was in flight."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import FakeServer, Reply, Request, chat_body  # noqa: E402
from ray_fixture import (  # noqa: E402
    attempts,
    cached_count,
    kill_session,
    ray_cluster,
    session_pids,
    sum_config,
    without_timing,
)

from distill.config import ConfigError, PipelineConfig  # noqa: E402
from distill.pipeline import run_stage  # noqa: E402
from distill.records import RunDir, read_jsonl  # noqa: E402
from tests.projects import write_sum_project  # noqa: E402
from tests.test_interrupts import default_sigint  # noqa: E402

fake_server = fakeserver_fixture.fake_server
__all__ = ["ray_cluster", "fake_server"]
pytestmark = pytest.mark.timeout(300)


def generated(run: Path) -> list[dict[str, Any]]:
    return read_jsonl(run / "generate" / "generations.jsonl")


def seed_index(req: Request) -> int:
    """i of the prompt "What is i + 1?"."""
    m = re.search(r"What is (\d+) \+ 1\?", req.prompt)
    assert m, req.prompt
    return int(m.group(1))


def test_ray_generate_gives_the_local_rows_and_a_rerun_sends_nothing(
        ray_cluster: Any, fake_server: FakeServer, tmp_path: Path) -> None:
    write_sum_project(tmp_path, 10)
    local = run_stage("generate", sum_config(tmp_path, fake_server.url, samples=2),
                      RunDir(tmp_path / "local"))
    sent_local = fake_server.chat_count
    cfg = sum_config(tmp_path, fake_server.url, samples=2,
                     executor={"kind": "ray", "shards": 3})
    entry = run_stage("generate", cfg, RunDir(tmp_path / "ray"))
    assert without_timing(generated(tmp_path / "ray")) == without_timing(
        generated(tmp_path / "local"))
    assert fake_server.chat_count == 2 * sent_local  # every shard sent its own, once
    assert entry["rows"] == local["rows"] == 20 and entry["errors"] == 0
    assert entry["cost_usd"] == local["cost_usd"] > 0
    assert entry["prompt_tokens"] == local["prompt_tokens"]
    assert entry["requested"] == 20 and entry["sent"] == 20 and entry["cached"] == 0
    ex = entry["executor"]
    assert ex["kind"] == "ray" and ex["shards"] == 3 and ex["shards_run"] == 3
    assert ex["spent_this_run_usd"] == pytest.approx(entry["cost_usd"])
    shards = sorted((tmp_path / "ray" / "shards" / "generate" / "of-3").iterdir())
    assert [len(read_jsonl(d / "rows.jsonl")) for d in shards] == [6, 6, 8]  # seeds 3, 3, 4
    assert all((d / "done.json").exists() and cached_count(d / "cache.sqlite") > 0
               for d in shards)

    again = run_stage("generate", cfg, RunDir(tmp_path / "ray"), force=True)
    assert fake_server.chat_count == 2 * sent_local  # finished shards are skipped
    assert again["executor"]["shards_skipped"] == 3 and again["sent"] == 0
    assert again["cached"] == 20 and again["cost_usd"] == entry["cost_usd"]
    assert without_timing(generated(tmp_path / "ray")) == without_timing(
        generated(tmp_path / "local"))

    (shards[1] / "done.json").unlink()  # an unfinished shard: its cache still answers
    third = run_stage("generate", cfg, RunDir(tmp_path / "ray"), force=True)
    assert fake_server.chat_count == 2 * sent_local
    assert third["executor"]["shards_run"] == 1 and third["cached"] == 20


def adaptive_answers(req: Request) -> Reply:
    """Right for seed i at request seed s (the sample index) when (i + s) % 5 == 0, so seeds
    need different numbers of rounds."""
    i, seed = seed_index(req), int((req.body or {}).get("seed") or 0)
    texts = []
    for j in range(req.n):
        answer = i + 1 if (i + seed + j) % 5 == 0 else i + 2
        texts.append(f"{i} + 1 = {answer}. The answer is {answer}.")
    return Reply(body=chat_body(req, texts=texts))


def test_adaptive_sampling_runs_per_shard_with_the_local_rows(
        ray_cluster: Any, fake_server: FakeServer, tmp_path: Path) -> None:
    write_sum_project(tmp_path, 9)
    fake_server.handler = adaptive_answers
    adaptive = {"k": 1, "max_samples": 6, "rounds": 3}
    local = run_stage("generate", sum_config(tmp_path, fake_server.url, adaptive=adaptive),
                      RunDir(tmp_path / "local"))
    entry = run_stage("generate", sum_config(tmp_path, fake_server.url, adaptive=adaptive,
                                             executor={"kind": "ray", "shards": 2}),
                      RunDir(tmp_path / "ray"))
    rows = generated(tmp_path / "ray")
    assert without_timing(rows) == without_timing(generated(tmp_path / "local"))
    assert {r["adaptive_round"] for r in rows} == {0, 1, 2}  # rounds really varied by seed
    for key in ("seeds_solved", "samples", "verified_samples", "kept_rows", "rounds_run",
                "samples_per_kept_row", "samples_per_seed_histogram", "per_round",
                "solved_in_round_histogram"):
        assert entry["adaptive"][key] == local["adaptive"][key], key
    assert entry["cost_usd"] == local["cost_usd"]


def test_killed_worker_is_retried_with_no_duplicates(ray_cluster: Any, fake_server: FakeServer,
                                                     tmp_path: Path) -> None:
    """Shard 1 (seeds 8..15) gets its first 3 requests answered, then the next ones hang until
    the test has SIGKILLed the worker running it; Ray retries the shard, which resends only
    what its cache lacks: the 2 requests in flight (max_concurrency) at the kill."""
    write_sum_project(tmp_path, 16)
    killed = threading.Event()
    seen: list[tuple[int, bool]] = []  # (seed index, arrived after the kill)
    lock = threading.Lock()

    def handler(req: Request) -> Reply:
        i = seed_index(req)
        with lock:
            seen.append((i, killed.is_set()))
            slow = i >= 8 and not killed.is_set() and sum(j >= 8 for j, _ in seen) > 3
        return Reply(body=chat_body(req), delay=60.0 if slow else 0.0)

    def shard1_seen() -> list[int]:
        with lock:
            return [i for i, _ in seen if i >= 8]

    fake_server.handler = handler
    cfg = sum_config(tmp_path, fake_server.url, executor={"kind": "ray", "shards": 2})
    run = RunDir(tmp_path / "ray")
    shard1 = run.root / "shards" / "generate" / "of-2" / "00001"
    out: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: out.update(run_stage("generate", cfg, run)))
    driver.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            cached_count(shard1 / "cache.sqlite") == 3 and len(shard1_seen()) == 5):
        time.sleep(0.05)
    assert cached_count(shard1 / "cache.sqlite") == 3 and len(shard1_seen()) == 5
    (first,) = attempts(shard1)
    os.kill(first["pid"], signal.SIGKILL)
    with lock:
        order = [i for i, _ in seen if i >= 8]
        fast, in_flight = set(order[:3]), set(order[3:])  # answered (cached) / hanging
        killed.set()
    driver.join(180)
    assert not driver.is_alive() and out.get("status") == "done"

    tries = attempts(shard1)
    assert len(tries) == 2 and tries[1]["pid"] != first["pid"]
    assert out["executor"]["retried_shards"] == 1
    rows = generated(run.root)
    assert [(r["seed_id"], r["sample"]) for r in rows] == [(f"s{i}", 0) for i in range(16)]
    retried = sorted(i for i, after in seen if after and i >= 8)
    assert len(fast) == 3 and len(in_flight) == 2
    assert retried == sorted(set(range(8, 16)) - fast)  # what the cache lacked: the 2 in
    assert set(retried) & set(order) == in_flight  # flight (resent) and the 3 never sent


DRIVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from ray_fixture import sum_config
    from distill.pipeline import run_stage
    from distill.records import RunDir

    root, url = Path(sys.argv[1]), sys.argv[2]
    cfg = sum_config(root, url, executor={"kind": "ray", "shards": 4, "local_cpus": 2})
    run_stage("generate", cfg, RunDir(root / "run"))
    print("finished", flush=True)
""")


def wait_for_six_cached_four_hanging(proc: subprocess.Popen[Any], shards: Path,
                                     seen: list[Any]) -> None:
    """Until the driver's shards have cached 6 answers and 4 more requests hang (2 shards at
    once x max_concurrency 2)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (
            sum(cached_count(d / "cache.sqlite") for d in shards.glob("0*")) == 6
            and len(seen) == 6 + 4):
        if proc.poll() is not None:
            pytest.fail(f"driver exited early: {proc.communicate()}")
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and ps sessions: Linux")
def test_driver_sigkill_then_rerun_resends_at_most_the_in_flight_requests(
        ray_cluster: Any, tmp_path: Path) -> None:
    """The driver (its own Ray instance, 2 CPUs) is SIGKILLed once 6 answers are cached and
    the next requests hang; the rerun resends only those in flight (<= 2 shards x 2)."""
    write_sum_project(tmp_path, 24)
    killed = threading.Event()
    seen: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def handler(req: Request) -> Reply:
        with lock:
            seen.append((seed_index(req), killed.is_set()))
            slow = not killed.is_set() and len(seen) > 6
        return Reply(body=chat_body(req), delay=60.0 if slow else 0.0)

    shards = tmp_path / "run" / "shards" / "generate" / "of-4"
    with FakeServer(handler) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(tmp_path), server.url,
             str(Path(__file__).resolve().parent)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            wait_for_six_cached_four_hanging(proc, shards, seen)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL
        finally:
            kill_session(proc.pid)  # the Ray processes it started, by pid
        deadline = time.monotonic() + 30
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session_pids(proc.pid)
        with lock:
            in_flight = {i for i, _ in seen[6:]}
            before = len(seen)
            killed.set()
        assert len(in_flight) == 4  # 2 shards at once x max_concurrency 2, all hanging
        assert sum(cached_count(d / "cache.sqlite") for d in shards.glob("0*")) == 6

        entry = run_stage("generate", sum_config(tmp_path, server.url, executor={
            "kind": "ray", "shards": 4}), RunDir(tmp_path / "run"))
        again = [i for i, _ in seen[before:]]
        resent = set(again) & {i for i, _ in seen[:before]}
        assert resent == in_flight and len(again) == len(set(again)) == 24 - 6
        assert entry["status"] == "done" and entry["rows"] == 24 and entry["cached"] == 6
        assert [r["seed_id"] for r in generated(tmp_path / "run")] == [
            f"s{i}" for i in range(24)]


def test_what_a_shard_cannot_do_is_refused_up_front(tmp_path: Path) -> None:
    write_sum_project(tmp_path, 2)
    cfg = sum_config(tmp_path, "http://127.0.0.1:9/v1", executor={"kind": "ray"})
    cfg.generate.task = "instruct"
    with pytest.raises(ConfigError, match=r"^executor\.kind: ray shards seeds"):
        run_stage("generate", cfg, RunDir(tmp_path / "run"))
    from distill.pipeline import run_pipeline

    with pytest.raises(ConfigError, match=r"^executor\.kind: ray shards seeds"):
        run_pipeline(cfg, RunDir(tmp_path / "early"), ["generate"])
    assert not (tmp_path / "early").exists()
    cfg = sum_config(tmp_path, "http://127.0.0.1:9/v1", executor={"kind": "ray"}, batch=True)
    with pytest.raises(ConfigError, match=r"^teacher\.batch: "):
        run_stage("generate", cfg, RunDir(tmp_path / "run2"))


def test_executor_address_is_checked() -> None:
    from pydantic import ValidationError

    def cfg(address: str | None) -> PipelineConfig:
        return PipelineConfig.model_validate({"name": "x", "seeds": {"path": "s.jsonl"},
                                              "executor": {"kind": "ray", "address": address}})

    for ok in (None, "auto", "ray://head:10001", "10.0.0.5:6379"):
        assert cfg(ok).executor.address == ok
    with pytest.raises(ValidationError, match="expected null, auto, ray://HOST:PORT"):
        cfg("somewhere")


def test_bad_executor_input_is_one_line_naming_the_field(tmp_path: Path) -> None:
    from distill.config import load_config

    write_sum_project(tmp_path, 2)
    path = tmp_path / "pipeline.yaml"
    head = "name: x\nseeds: {path: seeds.jsonl}\n"
    path.write_text(head + "executor: {kind: ray, address: nowhere}\n")
    with pytest.raises(ConfigError, match=r"executor\.address: .*expected null, auto"):
        load_config(path)
    path.write_text(head + "executor: {kind: dask}\n")
    with pytest.raises(ConfigError, match=r"executor\.kind: "):
        load_config(path)


def test_ray_missing_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.pipeline import run_pipeline

    write_sum_project(tmp_path, 2)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the `ray` extra were not installed
    cfg = sum_config(tmp_path, "http://127.0.0.1:9/v1", executor={"kind": "ray"})
    with pytest.raises(ConfigError, match=r"^executor\.kind: ray needs Ray; pip install -e "):
        run_pipeline(cfg, RunDir(tmp_path / "run"), ["generate"])
    assert not (tmp_path / "run").exists()  # said before the run directory was touched
    with pytest.raises(ConfigError, match=r"^executor\.kind: ray needs Ray; pip install -e "):
        run_stage("generate", cfg, RunDir(tmp_path / "run"))  # the stage itself says it too


def test_a_local_run_never_imports_ray() -> None:
    code = ("import sys; import distill.pipeline, distill.generate.stage, distill.evaluate.stage,"
            " distill.filter.chain, distill.executor; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)



@pytest.mark.skipif(sys.platform != "linux", reason="signals and ps sessions: Linux")
def test_ctrl_c_on_ray_exits_1_stops_its_cluster_and_the_rerun_resends_only_in_flight(
        tmp_path: Path) -> None:
    """`distill run` with `executor.kind: ray` (its own 2-CPU cluster) gets SIGINT while 4
    requests hang: exit 1 within seconds, one line, no traceback, every Ray process it started
    gone; the rerun resends only the requests that were in flight."""
    write_sum_project(tmp_path, 24)
    stopped = threading.Event()
    seen: list[int] = []
    lock = threading.Lock()

    def handler(req: Request) -> Reply:
        with lock:
            seen.append(seed_index(req))
            slow = not stopped.is_set() and len(seen) > 6
        return Reply(body=chat_body(req), delay=60.0 if slow else 0.0)

    shards = tmp_path / "run" / "shards" / "generate" / "of-4"
    with FakeServer(handler) as server:
        pipeline = tmp_path / "p.yaml"
        pipeline.write_text(textwrap.dedent(f"""
            name: ray-ctrl-c
            stages: [generate]
            seeds: {{path: seeds.jsonl}}
            teacher: {{backend: openai, model: fake-model, base_url: "{server.url}",
                      api_key_env: null, max_concurrency: 2, timeout_s: 120}}
            generate: {{prompt: p.j2, max_tokens: 16}}
            executor: {{kind: ray, shards: 4, local_cpus: 2}}
        """))
        cmd = [sys.executable, "-c", "from distill.cli import main; main()", "run",
               str(pipeline), "--run-dir", str(tmp_path / "run")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=default_sigint)
        try:
            wait_for_six_cached_four_hanging(proc, shards, seen)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            waited = time.monotonic() - t0
            deadline = time.monotonic() + 30
            leftover = session_pids(proc.pid)
            while leftover and time.monotonic() < deadline:  # Ray's own processes, stopping
                time.sleep(0.2)
                leftover = session_pids(proc.pid)
        finally:
            kill_session(proc.pid)  # whatever is left (the assertion below says if any was)
        assert proc.returncode == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("error: interrupted; rerun"), err[-2000:]
        assert waited < 20, f"{waited:.1f} s from Ctrl-C to exit"
        assert not leftover, leftover
        with lock:
            in_flight, before = set(seen[6:]), len(seen)
            stopped.set()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stderr[-3000:]
        resent = set(seen[before:]) & set(seen[:before])
        assert resent <= in_flight and len(seen[before:]) == 24 - 6
    assert [r["seed_id"] for r in generated(tmp_path / "run")] == [f"s{i}" for i in range(24)]
