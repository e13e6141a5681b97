"""A full disk and damaged run-directory state (#27): the CLI exits with one line naming the file
and what to do, no traceback; earlier outputs stay byte for byte; nothing is reset in a way that
pays the teacher again (the fake server counts what is sent).

A full disk is played by a file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored: a write past it
fails with EFBIG, as ENOSPC does on a full disk).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import FakeServer  # noqa: E402
from projects import write_sum_project  # noqa: E402

from distill.damage import DiskFull  # noqa: E402
from distill.records import atomic_path, write_json, write_jsonl  # noqa: E402

pytestmark = pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")

fake_server = fakeserver_fixture.fake_server

MAIN = "from distill.cli import main; main()"
LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "n = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); " + MAIN)


def _project(tmp_path: Path, url: str, n: int) -> Path:
    write_sum_project(tmp_path, n)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent(f"""
        name: damage
        stages: [generate, filter]
        seeds: {{path: seeds.jsonl}}
        teacher: {{backend: openai, model: fake-model, base_url: "{url}", api_key_env: null,
                  max_concurrency: 1}}
        generate: {{prompt: p.j2, max_tokens: 16}}
        filter: {{dedup: {{exact: true}}}}
    """))
    return pipeline


def _distill(*args: str | Path, max_file_bytes: int | None = None
             ) -> subprocess.CompletedProcess[str]:
    code = [LIMITED, str(max_file_bytes)] if max_file_bytes else [MAIN]
    return subprocess.run([sys.executable, "-c", *code, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _one_error_line(res: subprocess.CompletedProcess[str], code: int) -> str:
    """The run failed with `code` and said why in one line, without a traceback."""
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), res.stderr
    return errors[0]


def _files(run: Path) -> dict[str, bytes]:
    """Every file of the run directory (temporary ones too) but the manifest and the lock."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".lock")}


# ---------------------------------------------------------------------------------- full disk


def test_a_full_disk_inside_a_stage_directory_keeps_the_good_one(tmp_path: Path) -> None:
    good = tmp_path / "filter"
    write_jsonl(good / "rows.jsonl", [{"id": 1}])

    def rows() -> Iterator[dict[str, Any]]:
        yield {"id": 2}
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFull) as caught, atomic_path(good) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "rows.jsonl", rows())
    # Named by where it was going, not by its temporary twin.
    assert caught.value.path == good / "rows.jsonl" and caught.value.errno == errno.ENOSPC
    assert str(caught.value) == (f"no space left on device writing {good / 'rows.jsonl'}: free "
                                 "space and rerun; earlier outputs are intact")
    assert (good / "rows.jsonl").read_text() == '{"id":1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filter"]  # no temporary left


def test_no_room_for_the_temporary_directory_names_the_file(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    def no_room(prefix: str, dir: Path) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dir / f"{prefix}x1y2"))

    monkeypatch.setattr("tempfile.mkdtemp", no_room)
    with pytest.raises(DiskFull, match="no space left on device writing .*manifest.json: "):
        write_json(tmp_path / "manifest.json", {"stages": {}})


def test_a_full_disk_while_filter_writes_exits_1_and_keeps_every_output(
        tmp_path: Path, fake_server: FakeServer) -> None:
    run = tmp_path / "run"
    pipeline = _project(tmp_path, fake_server.url, 100)
    assert _distill("run", pipeline, "--run-dir", run).returncode == 0
    before = _files(run)
    assert fake_server.chat_count == 100 and "filter/filtered.jsonl" in before

    # 40 kB: room for the config, the manifest and the cache's index, not for filter's rows.
    res = _distill("filter", pipeline, "--run-dir", run, max_file_bytes=40_000)
    line = _one_error_line(res, 1)
    assert line.startswith(f"error: file too large writing {run / 'filter'}"), line
    assert line.endswith("free space and rerun; earlier outputs are intact")
    assert _files(run) == before  # byte for byte, and no temporary file left behind
    assert json.loads((run / "manifest.json").read_text())["stages"]["filter"]["status"] == \
        "failed"

    assert _distill("filter", pipeline, "--run-dir", run).returncode == 0
    assert fake_server.chat_count == 100


def test_a_full_disk_while_caching_answers_keeps_those_cached(tmp_path: Path,
                                                               fake_server: FakeServer) -> None:
    run = tmp_path / "run"
    pipeline = _project(tmp_path, fake_server.url, 8)
    # 40 kB: sqlite's shared-memory index fits (32 kB), its log of a few answers does not.
    res = _distill("generate", pipeline, "--run-dir", run, max_file_bytes=40_000)
    assert res.returncode == 1, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"writing {run / 'cache.sqlite'}: free space" in line
    sent = fake_server.chat_count
    assert 0 < sent < 8 and not (run / "generate").exists()

    assert _distill("generate", pipeline, "--run-dir", run).returncode == 0
    assert fake_server.chat_count - sent < 8  # what was cached before the failure is not resent
    _one_error_line(res, 1)


# ---------------------------------------------------------------------------- damaged state


def test_a_damaged_cache_is_reported_never_replaced(tmp_path: Path,
                                                    fake_server: FakeServer) -> None:
    run = tmp_path / "run"
    pipeline = _project(tmp_path, fake_server.url, 8)
    assert _distill("generate", pipeline, "--run-dir", run).returncode == 0
    cache = run / "cache.sqlite"
    good = cache.read_bytes()
    # (An empty file holds no answer to protect, as when killed while sqlite created it: it is
    # taken as a new cache.)
    for damage in (b"not a database " * 100, good[: len(good) // 2]):
        cache.write_bytes(damage)
        line = _one_error_line(_distill("generate", pipeline, "--run-dir", run), 2)
        assert line.startswith(f"error: {cache}: the response cache is damaged"), line
        assert "paid again" in line and "aside" in line
        assert cache.read_bytes() == damage  # left as it was for the user to look at
        assert fake_server.chat_count == 8
    cache.write_bytes(good)  # a good copy put back: nothing is sent again
    assert _distill("generate", pipeline, "--run-dir", run).returncode == 0
    assert fake_server.chat_count == 8


def test_a_damaged_manifest_is_reported_and_moving_it_aside_reruns_from_cache(
        tmp_path: Path, fake_server: FakeServer) -> None:
    run = tmp_path / "run"
    pipeline = _project(tmp_path, fake_server.url, 8)
    assert _distill("run", pipeline, "--run-dir", run).returncode == 0
    manifest = run / "manifest.json"
    manifest.write_text('{"name": "damage", "stages": {"generate": {"status": "do')
    for res in (_distill("run", pipeline, "--run-dir", run), _distill("report", run)):
        line = _one_error_line(res, 2)
        assert line.startswith(f"error: {manifest}: damaged, invalid JSON"), line
        assert f"mv {manifest} {manifest}.bad" in line and "not paid again" in line
    assert manifest.read_text().endswith('"do')  # not rewritten
    manifest.rename(run / "manifest.json.bad")
    assert _distill("run", pipeline, "--run-dir", run).returncode == 0
    assert fake_server.chat_count == 8  # every stage ran again, its answers from the cache
    assert json.loads(manifest.read_text())["stages"]["filter"]["status"] == "done"


def test_a_truncated_rows_file_names_its_line_and_the_command_that_rebuilds_it(
        tmp_path: Path, fake_server: FakeServer) -> None:
    run = tmp_path / "run"
    pipeline = _project(tmp_path, fake_server.url, 8)
    assert _distill("generate", pipeline, "--run-dir", run).returncode == 0
    rows = run / "generate" / "generations.jsonl"
    good = rows.read_bytes()
    rows.write_bytes(good[:-40])  # the last line cut short
    line = _one_error_line(_distill("filter", pipeline, "--run-dir", run), 2)
    assert line.startswith(f"error: {rows}:8: invalid JSON"), line
    assert f"distill generate PIPELINE --run-dir {run}" in line and "not paid again" in line
    assert not (run / "filter").exists()

    assert _distill("generate", pipeline, "--run-dir", run).returncode == 0
    assert rows.read_bytes() == good and fake_server.chat_count == 8
    assert _distill("filter", pipeline, "--run-dir", run).returncode == 0
