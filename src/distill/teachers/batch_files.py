"""Batch API files: request lines, splitting under the provider's limits, and the batch record.

One JSONL line per (prompt, sample):

    {"custom_id": "<32 hex>", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

`custom_id` is the start of the sample's response-cache key, so the output of a batch submitted
by an earlier (killed) process maps back onto the same prompts and samples. The body is what the
online client would send for that sample alone (seed + sample index). The same file runs offline
on vLLM: `vllm run-batch -i batch.jsonl -o out.jsonl --model <model>`.

The record (`generate/batches.json` in the run directory) lists every batch the moment the
provider has given it an id, with the custom ids it covers; it is rewritten atomically, so a
rerun after kill -9 polls the batches already paid for instead of submitting them again.

An upload is named after its content (`upload_name`) and a batch carries a tag in its metadata,
so that either can be found on the provider when the answer to its creation was lost
(`find_file`, `find_batches`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import TeacherConfig
from distill.records import now, write_json
from distill.teachers.base import Job
from distill.teachers.cache import cache_key

log = logging.getLogger(__name__)

BATCH_URL = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
"""Batch statuses after which nothing more will arrive."""


@dataclass
class Line:
    """One request of a batch file."""

    custom_id: str
    job: Job
    sample: int
    data: bytes
    """The encoded JSONL line, newline included."""


def custom_id(backend: str, model: str, job: Job, sample: int) -> str:
    return cache_key(backend, model, job.messages, job.params, sample, job.response_format)[:32]


def request_body(cfg: TeacherConfig, job: Job, sample: int, reseed: int = 0) -> dict[str, Any]:
    """The chat request for one sample: the online client's request for it, flattened (the
    batch body has no `extra_body`: its fields sit beside the others)."""
    p = job.params
    body: dict[str, Any] = {
        "model": cfg.model, "messages": job.messages, "temperature": p.temperature,
        "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": p.seed + sample + 7919 * reseed,
    }
    if p.top_logprobs > 0:
        body.update(logprobs=True, top_logprobs=p.top_logprobs)
    if job.response_format is not None:
        body["response_format"] = job.response_format
    body.update(cfg.extra_body)
    return body


def encode_line(cid: str, body: dict[str, Any]) -> bytes:
    line = {"custom_id": cid, "method": "POST", "url": BATCH_URL, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def make_line(cfg: TeacherConfig, backend: str, job: Job, sample: int, reseed: int = 0) -> Line:
    cid = custom_id(backend, cfg.model, job, sample)
    return Line(cid, job, sample, encode_line(cid, request_body(cfg, job, sample, reseed)))


def split_lines(lines: Sequence[Line], max_requests: int, max_bytes: int) -> list[list[Line]]:
    """Consecutive chunks of at most `max_requests` lines and `max_bytes` bytes each (a single
    line over `max_bytes` still gets a chunk of its own: the provider will say what is wrong)."""
    chunks: list[list[Line]] = []
    chunk: list[Line] = []
    size = 0
    for line in lines:
        if chunk and (len(chunk) >= max_requests or size + len(line.data) > max_bytes):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line.data)
    if chunk:
        chunks.append(chunk)
    return chunks


def write_batch_jsonl(cfg: TeacherConfig, jobs: Iterable[Job], path: Path,
                      backend: str = "openai") -> list[Path]:
    """Write the batch input for `jobs` without submitting it; split into `path`, `path.1`, ...
    when over the provider's limits. Returns the files written."""
    lines = [make_line(cfg, backend, job, s) for job in jobs for s in job.samples]
    chunks = split_lines(lines, cfg.batch_max_requests, cfg.batch_max_bytes)
    paths = []
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks):
        out = path if i == 0 else path.with_name(f"{path.stem}.{i}{path.suffix}")
        out.write_bytes(b"".join(line.data for line in chunk))
        paths.append(out)
    return paths


def parse_output_line(raw: bytes | str) -> tuple[str | None, int | None, Any, str | None]:
    """(custom_id, HTTP status, response body, error text) of one output- or error-file line."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None, None, None, "malformed output line"
    if not isinstance(line, dict):
        return None, None, None, "malformed output line"
    cid = line.get("custom_id")
    cid = cid if isinstance(cid, str) else None
    raw_resp = line.get("response")
    resp: dict[str, Any] = raw_resp if isinstance(raw_resp, dict) else {}
    status = resp.get("status_code")
    status = status if isinstance(status, int) else None
    body = resp.get("body")
    err = line.get("error")
    why: str | None = None
    if isinstance(err, dict):
        why = f"{err.get('code') or 'error'}: {err.get('message') or ''}".strip()
    elif err:
        why = str(err)
    if why is None and status is not None and status != 200:
        inner = body.get("error", body) if isinstance(body, dict) else body
        msg = inner.get("message") if isinstance(inner, dict) else inner
        why = f"HTTP {status}: {msg}"
    if why is None and not isinstance(body, dict):
        why = "no response body"
    return cid, status, body, (why[:300] if why else None)


SEARCHED = 1000
"""How many of the provider's newest batches (or files) a lookup goes through."""


def upload_name(data: bytes) -> str:
    """The filename an input file is uploaded under: its content's digest, so an upload whose
    answer was lost is found again (`find_file`) rather than stored once more."""
    return f"distill-batch-{hashlib.sha256(data).hexdigest()[:32]}.jsonl"


async def find_batches(client: Any, tags: Collection[str]) -> dict[str, Any]:
    """{tag: batch} for the batches among the provider's newest `SEARCHED` whose metadata
    carries one of `tags` (the first found, newest first). Raises when the list cannot be read:
    the caller then does not know, which is not the same as "none"."""
    found: dict[str, Any] = {}
    if not tags:
        return found
    seen = 0
    async for b in client.batches.list(limit=100):
        tag = (b.metadata or {}).get("distill_tag")
        if isinstance(tag, str) and tag in tags and tag not in found:
            found[tag] = b
        seen += 1
        if len(found) == len(tags) or seen >= SEARCHED:
            break
    return found


async def find_file(client: Any, name: str, size: int) -> str | None:
    """The id of a batch input file named `name` of `size` bytes among the provider's newest
    `SEARCHED`, or None. Raises when the list cannot be read."""
    seen = 0
    async for f in client.files.list(purpose="batch", order="desc", limit=100):
        if f.filename == name and f.bytes in (None, size) and f.status != "error":
            return str(f.id)
        seen += 1
        if seen >= SEARCHED:
            break
    return None


class BatchRecord:
    """`batches.json`: every batch submitted for this run, rewritten atomically on each change.

    Before a batch is created its input file and a tag are written down (`intents`); the batch
    carries the tag in its metadata. A process killed between the provider creating the batch
    and the record being written finds it again by that tag instead of paying twice.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.batches: list[dict[str, Any]] = []
        self.intents: list[dict[str, Any]] = []
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            self.batches = list(data.get("batches") or [])
            self.intents = list(data.get("intents") or [])

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, {"version": 1, "batches": self.batches,
                                   "intents": self.intents})

    def intend(self, input_file_id: str, cids: list[str]) -> dict[str, Any]:
        intent = {"tag": uuid.uuid4().hex, "input_file_id": input_file_id, "custom_ids": cids,
                  "at": now()}
        self.intents.append(intent)
        self.save()
        return intent

    def add(self, batch_id: str, intent: dict[str, Any], status: str) -> dict[str, Any]:
        rec = {"id": batch_id, "input_file_id": intent["input_file_id"], "tag": intent["tag"],
               "status": status, "collected": False, "submitted_at": now(),
               "requests": len(intent["custom_ids"]), "custom_ids": intent["custom_ids"]}
        self.batches.append(rec)
        self.intents = [i for i in self.intents if i["tag"] != intent["tag"]]
        self.save()
        return rec

    def drop_intent(self, intent: dict[str, Any]) -> None:
        self.intents = [i for i in self.intents if i["tag"] != intent["tag"]]
        self.save()

    async def recover(self, client: Any) -> None:
        """Batches created just before a kill, whose ids never reached the record: found by
        the tag in their metadata (the newest 1,000 batches are searched). Intents without a
        batch are dropped: their lines are simply sent again."""
        if not self.intents:
            return
        tags = {i["tag"]: i for i in self.intents}
        try:
            found = await find_batches(client, tags)
        except Exception as err:  # noqa: BLE001 - then those lines are simply sent again
            log.warning("batch: listing batches failed (%s)", type(err).__name__)
            found = {}
        for tag, b in found.items():
            self.add(b.id, tags.pop(tag), b.status)
        for intent in list(tags.values()):
            self.drop_intent(intent)

    def open(self) -> list[dict[str, Any]]:
        """Batches whose results were not yet taken in."""
        return [b for b in self.batches if not b.get("collected")]

    def mark(self, rec: dict[str, Any], **fields: Any) -> None:
        rec.update(fields)
        self.save()
