"""Ctrl-C anywhere: SIGINT to a `distill` process mid-stage exits 1 within seconds with one line
and no traceback, replaces no good output, and the rerun resumes without paying again.

Training's Ctrl-C (a checkpoint at the end of the step, then resume) is in
tests/test_train_resume.py."""

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

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals are POSIX")

DISTILL = [sys.executable, "-c", "from distill.cli import main; main()"]


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A shell starts background jobs
    (`cmd &`, CI runners, nohup) with SIGINT ignored, children inherit that, and a Python that
    starts with SIGINT ignored keeps ignoring it: Ctrl-C could not be tested there."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _pipeline(tmp_path: Path, url: str, n: int, extra: str = "") -> Path:
    write_sum_project(tmp_path, n)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent(f"""
        name: ctrl-c
        stages: [generate, filter]
        seeds: {{path: seeds.jsonl}}
        teacher: {{backend: openai, model: fake-model, base_url: "{url}", api_key_env: null,
                  max_concurrency: 2}}
        generate: {{prompt: p.j2, max_tokens: 16}}
    """) + textwrap.dedent(extra))
    return pipeline


def _interrupt_when(cmd: list[str], ready: object, timeout: float = 60
                    ) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `cmd`, send it SIGINT once `ready()` is true; (its result, seconds from the signal
    to its exit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"not ready before exit/timeout: rc={proc.returncode} {err[-2000:]}")
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - t0


def _one_line_exit_1(res: subprocess.CompletedProcess[str], waited: float) -> None:
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; rerun the same command to resume"), last
    assert waited < 10, f"{waited:.1f} s from Ctrl-C to exit"


def test_ctrl_c_during_generate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with FakeServer(latency=0.25) as server:  # 40 requests, 2 at a time: ~5 s
        pipeline = _pipeline(tmp_path, server.url, 40)
        cmd = [*DISTILL, "run", str(pipeline), "--run-dir", str(run)]
        res, waited = _interrupt_when(cmd, lambda: server.chat_count >= 10)
        _one_line_exit_1(res, waited)
        sent = server.chat_count
        assert sent < 40
        assert not (run / "generate" / "generations.jsonl").exists()
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["stages"]["generate"]["status"] == "failed"
        assert (run / ".lock").read_text() == ""  # released
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        # What was answered before Ctrl-C came from the cache; at most the requests in flight
        # when it came (max_concurrency: 2) were lost and asked again.
        assert server.chat_count <= 40 + 2
    rows = [json.loads(line) for line in (run / "generate" / "generations.jsonl").open()]
    assert len(rows) == 40 and not any(r["error"] for r in rows)


def test_ctrl_c_during_filter_keeps_the_finished_generate(tmp_path: Path) -> None:
    """The LLM judge (against the slow server) makes filter long enough to interrupt."""
    run = tmp_path / "run"
    with FakeServer(latency=0.25) as server:
        pipeline = _pipeline(tmp_path, server.url, 24, """
            filter:
              verify: null
              judge: {threshold: 0}
        """)
        cmd = [*DISTILL, "run", str(pipeline), "--run-dir", str(run)]
        gen = run / "generate" / "generations.jsonl"
        res, waited = _interrupt_when(cmd, lambda: gen.exists() and server.chat_count >= 30)
        _one_line_exit_1(res, waited)
        before = gen.read_bytes()
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["stages"]["generate"]["status"] == "done"
        assert manifest["stages"]["filter"]["status"] == "failed"
        assert not (run / "filter" / "filtered.jsonl").exists()
        sent = server.chat_count
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert gen.read_bytes() == before  # generate was not redone
        assert server.chat_count - sent <= 24 - (sent - 24) + 2  # judged rows not judged again


# `distill ...` that sends itself SIGINT (a Ctrl-C) once the export stage has recorded its
# first finished artifact.
CTRL_C_AFTER_ONE_ARTIFACT = textwrap.dedent("""
    import os, signal, sys
    import distill.export.stage as stage

    plain = stage.write_json
    def write_json(path, data):
        plain(path, data)
        if path.parent.name == ".done" and path.name != "key.json":
            os.kill(os.getpid(), signal.SIGINT)
    stage.write_json = write_json
    from distill.cli import main
    sys.argv = ["distill", *sys.argv[1:]]
    main()
""")


def _without_timings(doc: dict[str, object]) -> dict[str, object]:
    timing = {"export_s", "measure_s", "latency_p50_s", "latency_p95_s", "tokens_per_s",
              "peak_mem_mb", "wall_s", "load_s", "first_token_s", "rss_mb"}
    rows = [{k: v for k, v in r.items() if k not in timing and not k.endswith("_s")}
            for r in doc["artifacts"]]  # type: ignore[union-attr]
    return {"artifacts": rows, "formats": [r["format"] for r in rows]}


def test_ctrl_c_during_export_keeps_the_good_export_and_the_finished_artifact(
        tmp_path: Path, tiny_teacher: Path) -> None:
    import shutil

    from tests.test_export import _project

    pipeline = _project(tmp_path, tiny_teacher, ["merged", "int8"])
    yaml = pipeline.read_text().replace("name: export-test", "name: export-test\nstages: [export]")
    pipeline.write_text(yaml)
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run / "student")
    cmd = ["run", str(pipeline), "--run-dir", str(run)]
    first = subprocess.run([*DISTILL, *cmd], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    good = (run / "export" / "export.json").read_bytes()
    # A new export (another eval_limit), interrupted after its first artifact.
    again = [*cmd, "--set", "export.eval_limit=2"]
    res = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_ONE_ARTIFACT, *again],
                         capture_output=True, text=True, timeout=300, preexec_fn=default_sigint)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: interrupted; rerun")
    assert (run / "export" / "export.json").read_bytes() == good  # the good one, whole
    staged = run / ".export.partial"
    assert (staged / ".done" / "merged.json").is_file()
    assert not (staged / ".done" / "int8.json").exists()

    done = subprocess.run([*DISTILL, *again], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "export merged: kept from the interrupted run" in done.stderr
    assert not staged.exists() and not (run / ".export.old").exists()
    resumed = json.loads((run / "export" / "export.json").read_text())
    assert [a["path"] for a in resumed["artifacts"]] == ["export/merged", "export/int8"]
    assert (run / "export" / "int8").is_dir() and not (run / "export" / ".done").exists()
    # ...and the same artifacts as an export that ran through.
    straight = tmp_path / "straight"
    shutil.copytree(tiny_teacher, straight / "student")
    ref = subprocess.run([*DISTILL, "run", str(pipeline), "--run-dir", str(straight), "--set",
                          "export.eval_limit=2"], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads((straight / "export" / "export.json").read_text())
    assert _without_timings(resumed) == _without_timings(expected)


# `distill ...` that sends itself SIGINT once the evaluate stage has scored two models.
CTRL_C_AFTER_TWO_MODELS = textwrap.dedent("""
    import os, signal, sys
    import distill.evaluate.stage as stage

    plain, scored = stage.score_model, []
    def score_model(*args, **kwargs):
        out = plain(*args, **kwargs)
        scored.append(args[0])
        if len(scored) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    stage.score_model = score_model
    from distill.cli import main
    sys.argv = ["distill", *sys.argv[1:]]
    main()
""")


def test_ctrl_c_during_evaluate_then_rerun_gives_the_same_metrics(
        tmp_path: Path, tiny_teacher: Path) -> None:
    import shutil

    from tests.test_export import _project

    pipeline = _project(tmp_path, tiny_teacher, ["merged"])
    pipeline.write_text(pipeline.read_text().replace(
        "name: export-test", f"name: eval-test\nstages: [evaluate]\ntrain: {{student: "
                             f"{tiny_teacher}}}"))
    runs = {name: tmp_path / name for name in ("stopped", "straight")}
    for run in runs.values():
        shutil.copytree(tiny_teacher, run / "student")
    cmd = ["run", str(pipeline), "--run-dir", str(runs["stopped"])]
    res = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_TWO_MODELS, *cmd],
                         capture_output=True, text=True, timeout=300, preexec_fn=default_sigint)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: interrupted; rerun")
    assert not (runs["stopped"] / "evaluate" / "metrics.json").exists()
    assert (runs["stopped"] / "evaluate" / "answers.sqlite").is_file()  # base student's answers
    again = subprocess.run([*DISTILL, *cmd], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    ref = subprocess.run([*DISTILL, "run", str(pipeline), "--run-dir", str(runs["straight"])],
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    def answers(run: Path) -> list[tuple[object, ...]]:
        rows = [json.loads(line) for line in (run / "evaluate" / "predictions.jsonl").open()]
        return [(r["model"], r["id"], r["response"], r["correct"]) for r in rows]

    assert answers(runs["stopped"]) == answers(runs["straight"])
    m1, m2 = (json.loads((r / "evaluate" / "metrics.json").read_text()) for r in runs.values())
    assert m1["student_accuracy"] == m2["student_accuracy"]
    assert m1["base_student_accuracy"] == m2["base_student_accuracy"]
