"""The README's Python API example runs as written (on a local micro project)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _api_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README: the api-example block is gone"
    return m.group(1)


def test_readme_python_api_example_runs(micro_pipeline: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    project = micro_pipeline.parent.parent
    shutil.copy(micro_pipeline, project / "pipeline.yaml")  # the example's file name
    monkeypatch.chdir(project)
    scope: dict[str, object] = {}
    exec(compile(_api_example(), "README.md", "exec"), scope)  # noqa: S102 - our own README
    ds, rows = scope["ds"], scope["train_rows"]
    assert len(ds) == 12  # type: ignore[arg-type]  # 6 seeds x 2 samples
    assert isinstance(rows, list) and rows and "messages" in rows[0]
    assert (project / "runs" / "micro" / "filter" / "funnel.json").is_file()
