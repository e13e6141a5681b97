"""Big and bad inputs stay bounded (issue #27): a seed file that is not UTF-8, holds a huge
field or repeats an id is exit 2 naming the line; a pipeline file whose YAML aliases expand
to something huge is exit 2 naming the file, at once and in little memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.seeds import MAX_FIELD_CHARS

PIPELINE = """
name: big
seeds:
  path: data/{seeds}
teacher:
  backend: openai
  model: fake
  base_url: http://127.0.0.1:9/v1
generate:
  prompt: prompts/cot.j2
"""


def _project(tmp_path: Path, seeds: str, content: bytes) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "prompts").mkdir(exist_ok=True)
    (tmp_path / "prompts" / "cot.j2").write_text("{{ question }}\nThink step by step.")
    (tmp_path / "data" / seeds).write_bytes(content)
    path = tmp_path / "big.yaml"
    path.write_text(PIPELINE.format(seeds=seeds))
    return path


def _dry_run(pipeline: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from distill.cli import main; main()", "run",
                           str(pipeline), "--dry-run"], cwd=pipeline.parent,
                          capture_output=True, text=True, timeout=120)


def _jsonl(*rows: dict[str, object]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_good_seeds_dry_run(tmp_path: Path) -> None:
    res = _dry_run(_project(tmp_path, "seeds.jsonl", _jsonl(
        {"id": "a", "question": "What is 1 + 1?", "answer": "2"},
        {"id": "b", "question": "What is 2 + 2?", "answer": "4"})))
    assert res.returncode == 0, res.stderr


def test_non_utf8_seed_line_is_exit_2_naming_the_line(tmp_path: Path) -> None:
    content = (_jsonl({"id": "a", "question": "ok", "answer": "1"})
               + b'{"id": "b", "question": "caf\xe9?", "answer": "2"}\n')
    res = _dry_run(_project(tmp_path, "seeds.jsonl", content))
    assert res.returncode == 2, res.stderr
    err = " ".join(res.stderr.split())
    assert "seeds.jsonl:2: not UTF-8 (byte 0xe9 at column 29)" in err
    assert "expected UTF-8" in err
    assert "Traceback" not in res.stderr


def test_non_utf8_json_list_names_the_line(tmp_path: Path) -> None:
    content = b'[\n {"id": "a", "question": "ok"},\n {"id": "b", "question": "\xff"}\n]\n'
    res = _dry_run(_project(tmp_path, "seeds.json", content))
    assert res.returncode == 2, res.stderr
    assert "seeds.json:3: not UTF-8 (byte 0xff" in " ".join(res.stderr.split())


def test_huge_field_is_refused_naming_the_line(tmp_path: Path) -> None:
    huge = "What is 1 + " + "1 + " * (MAX_FIELD_CHARS // 4) + "1?"
    content = _jsonl({"id": "a", "question": "ok"}, {"id": "b", "question": huge})
    res = _dry_run(_project(tmp_path, "seeds.jsonl", content))
    assert res.returncode == 2, res.stderr
    err = " ".join(res.stderr.split())
    assert "seeds.jsonl:2: field 'question' has" in err and "the limit for a seed is" in err


def test_a_field_of_several_mb_under_the_limit_is_accepted(tmp_path: Path) -> None:
    from distill.config import load_config
    from distill.seeds import load_seeds

    big = "é" * (MAX_FIELD_CHARS - 10)  # ~2 MB of UTF-8 on one line
    pipeline = _project(tmp_path, "seeds.jsonl", _jsonl({"id": "a", "question": big,
                                                         "answer": "1"}))
    seeds = load_seeds(load_config(pipeline))
    assert len(seeds) == 1 and seeds[0]["question"] == big


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    content = _jsonl({"id": "a", "question": "q1"}, {"id": "b", "question": "q2"},
                     {"id": "a", "question": "q3"})
    res = _dry_run(_project(tmp_path, "seeds.jsonl", content))
    assert res.returncode == 2, res.stderr
    err = " ".join(res.stderr.split())
    assert "seeds.jsonl:3: id: duplicate id 'a', first at" in err
    assert "seeds.jsonl:1" in err


def test_limit_stops_reading(tmp_path: Path) -> None:
    """seeds.limit reads no further: a bad line past it is never reached."""
    from distill.config import load_config
    from distill.seeds import load_seeds

    content = _jsonl({"id": "a", "question": "q1"}, {"id": "b", "question": "q2"}) + b"\xff\n"
    pipeline = _project(tmp_path, "seeds.jsonl", content)
    cfg = load_config(pipeline, ["seeds.limit=2"])
    assert [s["id"] for s in load_seeds(cfg)] == ["a", "b"]


BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi",
                                                                  strict=True)]) + "\n"


@pytest.mark.parametrize("text", [BOMB, "a: &a [*a]\n"], ids=["billion-laughs", "recursive"])
def test_yaml_alias_bomb_is_refused(tmp_path: Path, text: str) -> None:
    pipeline = tmp_path / "bomb.yaml"
    pipeline.write_text(text)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", "import resource, sys\n"
                          "resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))\n"
                          "from distill.cli import main; sys.argv[1:] = sys.argv[1:]; main()",
                          "run", str(pipeline), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert str(pipeline) in " ".join(res.stderr.split()) and "refused" in res.stderr
    assert time.perf_counter() - t0 < 30


def test_a_few_aliases_still_work() -> None:
    from distill.config import safe_load_bounded

    text = "base: &t {backend: openai, model: m}\njudge: {teacher: *t}\nx: {<<: *t, model: n}\n"
    assert safe_load_bounded(text, Path("p.yaml")) == {
        "base": {"backend": "openai", "model": "m"},
        "judge": {"teacher": {"backend": "openai", "model": "m"}},
        "x": {"backend": "openai", "model": "n"}}
