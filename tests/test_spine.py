"""Teacher backend + cache, resumability and bring-your-own data."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from distill.cli import app
from distill.config import TeacherConfig
from distill.records import RunDir
from distill.teachers import make_teacher
from distill.teachers.base import Job, SamplingParams
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import run_jobs

runner = CliRunner()


def _jobs(n: int = 3, temperature: float = 0.8) -> list[Job]:
    p = SamplingParams(temperature=temperature, max_tokens=16, seed=1)
    return [Job(key=f"k{i}", messages=[{"role": "user", "content": f"Tom has {i} apples."}],
                params=p, samples=[0, 1]) for i in range(n)]


def test_transformers_teacher_samples_and_cache(tiny_teacher: Path, tmp_path: Path) -> None:
    cfg = TeacherConfig(backend="transformers", model=str(tiny_teacher), batch_size=4)
    cache = ResponseCache(tmp_path / "cache.sqlite")
    results, stats = run_jobs(make_teacher(cfg), _jobs(), cache, show_progress=False)
    assert len(results) == 6 and stats.sent == 6 and stats.failed == 0
    comp = results[("k0", 0)]
    assert comp.finish_reason in ("stop", "length") and 0 < comp.completion_tokens <= 16
    assert comp.prompt_tokens > 0
    # Same jobs again: everything from the cache, nothing sent, identical texts.
    again, stats2 = run_jobs(make_teacher(cfg), _jobs(), cache, show_progress=False)
    assert stats2.sent == 0 and stats2.cached == 6
    assert {k: v.text for k, v in again.items()} == {k: v.text for k, v in results.items()}
    # A changed sampling parameter is a different key: nothing reused.
    _, stats3 = run_jobs(make_teacher(cfg), _jobs(temperature=0.3), cache, show_progress=False)
    assert stats3.cached == 0 and stats3.sent == 6
    cache.close()


def test_sampling_is_seeded(tiny_teacher: Path, tmp_path: Path) -> None:
    cfg = TeacherConfig(backend="transformers", model=str(tiny_teacher), batch_size=8)
    a, _ = run_jobs(make_teacher(cfg), _jobs(), None, show_progress=False)
    b, _ = run_jobs(make_teacher(cfg), _jobs(), None, show_progress=False)
    assert {k: v.text for k, v in a.items()} == {k: v.text for k, v in b.items()}


def test_missing_teacher_dir_is_a_clear_error(micro_pipeline: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["generate", str(micro_pipeline), "--run-dir", str(tmp_path / "r"),
                              "--set", f"teacher.model={tmp_path / 'nope'}"])
    assert res.exit_code == 2 and "teacher.model" in res.output


def test_changed_config_reruns_only_downstream(micro_pipeline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["run", str(micro_pipeline), "--run-dir", str(run_dir), "--set",
            "stages=[generate, filter]"]
    assert runner.invoke(app, args).exit_code == 0
    first = RunDir(run_dir).manifest()["stages"]
    # Filter config changed: generate is skipped (no teacher calls), filter reruns.
    res = runner.invoke(app, [*args, "--set", "filter.dedup.exact=false"])
    assert res.exit_code == 0, res.output
    second = RunDir(run_dir).manifest()["stages"]
    assert second["generate"]["finished"] == first["generate"]["finished"]
    assert second["filter"]["input_fingerprint"] != first["filter"]["input_fingerprint"]
    assert second["filter"]["kept"] >= first["filter"]["kept"]


def test_bring_your_own_generations(micro_pipeline: Path, tmp_path: Path) -> None:
    gens = tmp_path / "mine.jsonl"
    rows = [
        {"id": "a#0", "question": "What is 2 + 2?", "response": "2 + 2 = 4. The answer is 4.",
         "gold": "4"},
        {"id": "b#0", "question": "What is 3 + 3?", "response": "3 + 3 = 7. The answer is 7.",
         "gold": "6"},
        {"question": "What is 5 + 1?", "response": "**6**", "gold": "6"},
    ]
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    res = runner.invoke(app, ["run", str(micro_pipeline), "--run-dir", str(run_dir),
                              "--set", f"generate.source={gens}",
                              "--set", "stages=[generate, filter]"])
    assert res.exit_code == 0, res.output
    filtered = [json.loads(x) for x in
                (run_dir / "filter" / "filtered.jsonl").read_text().splitlines()]
    by_q = {r["question"]: r for r in filtered}
    assert by_q["What is 2 + 2?"]["keep"] and by_q["What is 5 + 1?"]["keep"]
    assert not by_q["What is 3 + 3?"]["keep"]
    assert "verify" in by_q["What is 3 + 3?"]["drop_reason"]
    sft = [json.loads(x) for x in (run_dir / "sft" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 2 and sft[0]["messages"][-1]["role"] == "assistant"


def test_bad_generations_file_names_the_row(micro_pipeline: Path, tmp_path: Path) -> None:
    gens = tmp_path / "bad.jsonl"
    gens.write_text(json.dumps({"question": "q"}) + "\n")
    res = runner.invoke(app, ["generate", str(micro_pipeline), "--run-dir", str(tmp_path / "r"),
                              "--set", f"generate.source={gens}"])
    assert res.exit_code == 2 and "bad.jsonl" in res.output and "response" in res.output
