"""Where the generate stage keeps its Batch API record (`teacher.batch`).

`generate/batches.json` lists every batch submitted for the run (`teachers.batch_files`). The
stage's output replaces `generate/` in one rename when it finishes; the record is carried into
the new directory, so the ids of the batches the data came from stay with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.records import RunDir

RECORD = "batches.json"


def record_path(run_dir: RunDir) -> Path:
    return run_dir.stage("generate") / RECORD


def stats(teacher: Any) -> dict[str, Any]:
    """The Batch API teacher's per-route line counts for the manifest (`{"batch": {...}}`), or
    nothing for an online teacher."""
    manifest_stats = getattr(teacher, "manifest_stats", None)
    return manifest_stats() if callable(manifest_stats) else {}


def carried(run_dir: RunDir) -> dict[str, Any]:
    """`write_stage` extra files: the batch record, when there is one."""
    path = record_path(run_dir)
    return {RECORD: json.loads(path.read_text())} if path.exists() else {}
