"""One process per run directory (`distill.runlock`): a second `distill` on a directory in use
exits 2 at once naming the holder; a lock left by a dead process is taken over with a note;
read-only commands need no lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakeserver import FakeServer  # noqa: E402
from projects import write_sum_project  # noqa: E402

pytestmark = pytest.mark.skipif(os.name != "posix", reason="flock and signals are POSIX")

DISTILL = [sys.executable, "-c", "from distill.cli import main; main()"]


def _project(tmp_path: Path, url: str, n: int = 8) -> Path:
    write_sum_project(tmp_path, n)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent(f"""
        name: locked
        stages: [generate]
        seeds: {{path: seeds.jsonl}}
        teacher: {{backend: openai, model: fake-model, base_url: "{url}", api_key_env: null,
                  max_concurrency: 1}}
        generate: {{prompt: p.j2, max_tokens: 16}}
    """))
    return pipeline


def _wait_for(predicate: object, proc: subprocess.Popen[str], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        if proc.poll() is not None:
            pytest.fail(f"exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.02)


def _holder_info(run: Path) -> dict[str, object]:
    lock = run / ".lock"
    text = lock.read_text() if lock.exists() else ""
    return json.loads(text) if text.strip() else {}


def test_second_distill_on_a_directory_in_use_exits_2_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with FakeServer(latency=0.4) as server:  # 8 requests one at a time: ~3 s of generate
        pipeline = _project(tmp_path, server.url)
        first = subprocess.Popen([*DISTILL, "run", str(pipeline), "--run-dir", str(run)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: _holder_info(run).get("pid") == first.pid, first)
        sent_before = server.chat_count
        t0 = time.monotonic()
        second = subprocess.run([*DISTILL, "run", str(pipeline), "--run-dir", str(run)],
                                capture_output=True, text=True, timeout=60)
        waited = time.monotonic() - t0
        assert first.poll() is None, "the first run should still hold the directory"
        assert second.returncode == 2, second.stderr
        err = " ".join(second.stderr.split())
        assert f"in use by pid {first.pid}" in err and "run" in err and "since" in err
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) <= 3
        assert waited < 30  # at once: it does not wait for the holder
        # Read-only commands do not need the lock.
        report = subprocess.run([*DISTILL, "report", str(run)], capture_output=True, text=True,
                                timeout=120)
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 0, out
        assert server.chat_count == 8 and sent_before <= 8  # the second sent nothing
    assert report.returncode in (0, 2)  # 2 only if the manifest was not there yet
    assert _holder_info(run) == {}  # a clean exit leaves no holder behind
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["status"] == "done"


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from distill.runlock import RunLock
    RunLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    from distill.config import ConfigError
    from distill.runlock import RunLock, RunLocked
    from distill.runlock import holder as lock_holder

    with pytest.raises(RunLocked, match=f"in use by pid {holder.pid}"):
        RunLock(run).acquire()
    assert issubclass(RunLocked, ConfigError)  # the CLI's exit 2
    assert lock_holder(run) is not None and lock_holder(run)["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert lock_holder(run) is None  # the kernel released it with the process
    with FakeServer() as server:
        pipeline = _project(tmp_path, server.url)
        res = subprocess.run([*DISTILL, "run", str(pipeline), "--run-dir", str(run)],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    err = " ".join(res.stderr.split())
    assert f"took over the lock left by pid {holder.pid}" in err and "no longer running" in err


def test_lock_is_reentrant_in_one_process_and_released(tmp_path: Path) -> None:
    from distill.runlock import RunLock, holder

    with RunLock(tmp_path / "r") as outer:
        with RunLock(tmp_path / "r"):  # the API nesting a run: no self-deadlock
            pass
        assert outer.fd is not None  # the inner exit did not release the outer lock
        probe = subprocess.run([sys.executable, "-c",
                                "import sys; from pathlib import Path; "
                                "from distill.runlock import holder; "
                                "h = holder(Path(sys.argv[1])); print(h['pid'] if h else None)",
                                str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() == str(os.getpid())
    assert holder(tmp_path / "r") is None
