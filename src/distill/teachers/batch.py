"""The OpenAI Batch API as a teacher: the same `stream` protocol, at the batch discount.

    upload the JSONL (files, purpose "batch") → create the batch (24h window) → record its id
    → poll every `batch_poll_s` → download output and error files → completions

Every completion streams into the response cache as the output file is read, like the online
client's. What can go wrong, and what happens:

- killed after submission: the batch id is in `generate/batches.json` (written atomically the
  moment the provider returns it; a tag in the batch metadata covers the instant between). The
  rerun polls that batch for the samples the cache still lacks and submits nothing again.
- a line fails (error file, a non-200 line, empty or invalid content, a `finish_reason` policy
  asking for a retry): it goes again, up to `max_retries` times; then an error row. Bad requests
  (4xx) are not retried.
- the batch expires or is cancelled: its finished lines are kept, and only the missing ones go
  again (no retry is counted: nothing was wrong with them).
- where a line goes again: a follow-up batch while it has been in at most `batch_follow_ups`
  batches (counted over the batch record, so a rerun carries the count on), else online at the
  full price. Each batch can take 24h: a line waits at most `1 + batch_follow_ups` windows.
- nothing is paid twice: a line that came back with a completion is never sent again, and the
  lines of batches still running (this process's or an earlier one's) are only polled.
- `max_cost_usd`: each batch reserves its worst case at the batch price before it is created;
  lines that do not fit wait for running batches to settle, or end as budget error rows.
- large jobs are split under `batch_max_requests` and `batch_max_bytes` per file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import ConfigError, TeacherConfig
from distill.teachers.base import BatchItem, Completion, ErrorKind, Job, Result, stream_batch
from distill.teachers.batch_files import (
    TERMINAL,
    BatchRecord,
    Line,
    make_line,
    parse_output_line,
    split_lines,
)
from distill.teachers.estimate import estimate_prompt_tokens
from distill.teachers.limits import Budget
from distill.teachers.openai_backend import OpenAITeacher
from distill.teachers.openai_client import base_urls, read_api_key
from distill.teachers.openai_wire import status_kind
from distill.teachers.responses import (
    NO_LOGPROBS,
    estimate_choice_tokens,
    read_choice,
    retry_note,
    served_model,
)

log = logging.getLogger(__name__)

_MISSING_CODES = ("batch_expired", "batch_cancelled")
ROUTES = ("batches_submitted", "batches_resumed", "polls", "lines_first_batch", "lines_follow_up",
          "lines_online", "lines_resumed", "lines_failed", "lines_expired")
"""`BatchTeacher.counters`. The lines each route sent, each line counted once per send:
`lines_first_batch` (in a line's first batch), `lines_follow_up` (in a later batch),
`lines_online` (at the full price), `lines_resumed` (in batches an earlier process submitted,
polled here). Of those batch lines, `lines_failed` came back without a completion to keep and
`lines_expired` were not run (their batch expired or was cancelled)."""
_RETRYABLE = {408, 409, 425, 429}


@dataclass
class _Item:
    """One sample still wanted, and what was spent on it so far."""

    job: Job
    sample: int
    cid: str
    attempts: int = 0
    reseed: int = 0
    reserved: float = 0.0
    carried: list[int] = field(default_factory=lambda: [0, 0])
    last_error: str = "no attempt made"
    batches: int = 0
    """Batches this sample was put in, by this process or an earlier one (the record)."""


class _Fatal(Exception):
    """A batch the provider refuses (a bad request or key): nothing more is submitted."""

    def __init__(self, kind: ErrorKind, why: str) -> None:
        super().__init__(why)
        self.kind: ErrorKind = kind
        self.why = why


class BatchTeacher:
    backend = "openai"
    """Same cache keys as the online client: a run may switch between the two and keep what it
    has."""

    def __init__(self, cfg: TeacherConfig, *, record_path: Path | None = None,
                 require_logprobs: bool = False, **online_options: Any) -> None:
        if not cfg.model:
            raise ConfigError("teacher.model: empty; expected the model name the server serves")
        self.cfg = cfg
        self.model_id = cfg.model
        self.urls = base_urls(cfg.base_url)
        read_api_key(cfg, self.urls)  # fail early; the value is not kept
        self.record = BatchRecord(record_path)
        self.require_logprobs = require_logprobs
        self.online_options = online_options
        """Passed to the online client that takes the lines whose batches are spent."""
        self.follow_ups = 0 if cfg.batch_retry == "online" else cfg.batch_follow_ups
        """Follow-up batches a line may go in before it goes online (`batch_follow_ups`)."""
        f = cfg.batch_price_factor
        self.budget = Budget(cfg.max_cost_usd, cfg.price_in_per_mtok * f,
                             cfg.price_out_per_mtok * f)
        self.counters: dict[str, int] = dict.fromkeys(ROUTES, 0)
        self.logprobs_missing = 0
        self._fatal: tuple[ErrorKind, str] | None = None
        self._client: Any = None
        self._waiting: set[str] = set()

    def __repr__(self) -> str:
        return f"BatchTeacher(model={self.model_id!r}, base_url={self.urls[0]!r})"

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    @property
    def budget_stopped(self) -> bool:
        return self.budget.closed

    def manifest_stats(self) -> dict[str, Any]:
        """For the stage's manifest entry: how many lines went which route (`ROUTES`)."""
        return {"batch": dict(self.counters)}

    def _open(self) -> None:
        from openai import AsyncOpenAI

        key = read_api_key(self.cfg, self.urls)
        # Control-plane calls (upload, create, poll, download) are few: the SDK's own retries
        # with backoff are enough for them.
        self._client = AsyncOpenAI(base_url=self.urls[0], api_key=key,
                                   max_retries=max(2, self.cfg.max_retries),
                                   timeout=max(self.cfg.timeout_s, 60.0))
        del key

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # the protocol ---------------------------------------------------------------------------
    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[Result]:
        items: dict[str, _Item] = {}
        for job in jobs:
            for s in job.samples:
                line = make_line(self.cfg, self.backend, job, s)
                items[line.custom_id] = _Item(job, s, line.custom_id)
        if not items:
            return
        if self._client is None:
            self._open()
        self._fatal = None
        self.budget.rebind()
        online: list[_Item] = []
        active = await self._resume(items)
        while True:
            ready = [it for cid, it in items.items() if cid not in self._waiting]
            if not self._fatal:  # lines whose batches are spent go online, once, at the end
                for it in [it for it in ready if it.batches > self.follow_ups]:
                    online.append(items.pop(it.cid))
                ready = [it for it in ready if it.cid in items]
            if ready:
                for result in await self._submit(ready, items, active):
                    yield result
            if not active:
                if not items:
                    break
                self._waiting.clear()  # nothing is running: whatever is left goes again
                continue  # a failed submission: its lines go again (retries are bounded)
            finished: list[dict[str, Any]] = []
            for rec in active:
                batch = await self._poll(rec)
                if batch is None or batch.status not in TERMINAL:
                    continue
                try:
                    results = await self._collect(rec, batch, items)
                except Exception as err:  # noqa: BLE001 - download again on the next poll
                    log.warning("batch %s: downloading results failed (%s); retrying",
                                rec["id"], type(err).__name__)
                    continue
                finished.append(rec)
                for result in results:
                    yield result
            active = [rec for rec in active if rec not in finished]
            if active and not finished:
                await asyncio.sleep(self.cfg.batch_poll_s)
        if online:
            async for result in self._online(online):
                yield result

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        return stream_batch(self, batch)

    # submitting -----------------------------------------------------------------------------
    async def _resume(self, items: dict[str, _Item]) -> list[dict[str, Any]]:
        """Batches an earlier process submitted for these samples: poll them, never resubmit."""
        await self.record.recover(self._client)
        for rec in self.record.batches:
            for cid in rec.get("custom_ids", []):
                if cid in items:
                    items[cid].batches += 1
        active = []
        for rec in self.record.open():
            mine = [cid for cid in rec.get("custom_ids", []) if cid in items]
            if not mine:
                continue  # another step's or round's batch; its own run takes it in
            for cid in mine:
                self._reserve(items[cid], force=True)
            self._waiting.update(mine)
            active.append(rec)
            self.counters["batches_resumed"] += 1
            self.counters["lines_resumed"] += len(mine)
            log.info("batch %s: resuming (%d samples still wanted)", rec["id"], len(mine))
        return active

    def _reserve(self, item: _Item, *, force: bool = False) -> bool:
        est = estimate_prompt_tokens(item.job.messages), item.job.params.max_tokens
        amount = self.budget.try_reserve(*est)
        if amount is None and force:  # already submitted: count it, it will be billed
            amount = self.budget.cost(*est)
            self.budget.reserved += amount
        if amount is None:
            return False
        item.reserved = amount
        return True

    async def _submit(self, ready: list[_Item], items: dict[str, _Item],
                      active: list[dict[str, Any]]) -> list[Result]:
        out: list[Result] = []
        if self._fatal:
            kind, why = self._fatal
            return [self._final(items, it, kind, f"not sent: {why}") for it in ready]
        fit = [it for it in ready if self._reserve(it)]
        if len(fit) < len(ready) and not active and not fit:
            self.budget.closed = True
            return [self._final(items, it, "budget", self.budget.message()) for it in ready]
        lines = [make_line(self.cfg, self.backend, it.job, it.sample, it.reseed) for it in fit]
        for chunk in split_lines(lines, self.cfg.batch_max_requests, self.cfg.batch_max_bytes):
            if not self._fatal:
                try:
                    active.append(await self._create(chunk, items))
                    continue
                except _Fatal as err:
                    self._fatal = (err.kind, err.why)
                    log.error("batch: %s; submitting nothing more", err)
                except Exception as err:  # noqa: BLE001 - transient: retried after a pause
                    why = f"batch submission failed: {type(err).__name__}: {err}"[:300]
                    log.warning("%s", why)
                    for line in chunk:
                        item = items[line.custom_id]
                        self._unreserve(item)
                        out += self._some(self._retry(items, item, "batch", why))
                    await asyncio.sleep(self.cfg.batch_poll_s)
                    continue
            assert self._fatal is not None
            kind, why = self._fatal[0], f"not sent: {self._fatal[1]}"
            out += [self._final(items, items[ln.custom_id], kind, why) for ln in chunk]
        # Lines held back by the budget wait for the running batches to settle.
        return out

    async def _create(self, chunk: list[Line], items: dict[str, _Item]) -> dict[str, Any]:
        import openai

        data = b"".join(line.data for line in chunk)
        try:
            upload = await self._client.files.create(
                file=("distill-batch.jsonl", data, "application/jsonl"), purpose="batch")
            intent = self.record.intend(upload.id, [line.custom_id for line in chunk])
            batch = await self._client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions",
                completion_window="24h", metadata={"distill_tag": intent["tag"]})
        except openai.APIStatusError as err:
            if err.status_code in (400, 401, 403, 404, 422):
                why = f"HTTP {err.status_code}: {err.message}"[:300]
                raise _Fatal(status_kind(err.status_code), why) from None
            raise
        rec = self.record.add(batch.id, intent, batch.status)
        self._waiting.update(line.custom_id for line in chunk)
        self.counters["batches_submitted"] += 1
        for line in chunk:
            item = items[line.custom_id]
            self.counters["lines_follow_up" if item.batches else "lines_first_batch"] += 1
            item.batches += 1
        log.info("batch %s: submitted %d requests (%d bytes)", batch.id, len(chunk), len(data))
        return rec

    async def _poll(self, rec: dict[str, Any]) -> Any:
        self.counters["polls"] += 1
        try:
            batch = await self._client.batches.retrieve(rec["id"])
        except Exception as err:  # noqa: BLE001 - the batch is still there: poll again later
            log.warning("batch %s: poll failed (%s)", rec["id"], type(err).__name__)
            return None
        if batch.status != rec.get("status"):
            self.record.mark(rec, status=batch.status)
        return batch

    # taking results in ----------------------------------------------------------------------
    async def _collect(self, rec: dict[str, Any], batch: Any, items: dict[str, _Item]
                       ) -> list[Result]:
        mine = {cid for cid in rec.get("custom_ids", []) if cid in items and cid in self._waiting}
        texts = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                texts.append((await self._client.files.content(file_id)).content)
        out: list[Result] = []
        seen: set[str] = set()
        for text in texts:
            for raw in text.splitlines():
                if not raw.strip():
                    continue
                cid, status, body, why = parse_output_line(raw)
                if cid is None or cid not in mine or cid in seen:
                    continue
                seen.add(cid)
                self._waiting.discard(cid)
                out += await self._take(items, items[cid], rec["id"], status, body, why)
        missing = mine - seen
        failure = _batch_errors(batch)
        for cid in sorted(missing):
            item = items[cid]
            self._waiting.discard(cid)
            self._unreserve(item)
            if batch.status in ("expired", "cancelled"):
                self.counters["lines_expired"] += 1  # not its fault: no attempt counted
            else:
                why = failure or f"missing from the output of batch {rec['id']} ({batch.status})"
                out += self._failed(items, item, "batch", why)
        self.record.mark(rec, status=batch.status, collected=True)
        log.info("batch %s: %s; %d results, %d missing", rec["id"], batch.status, len(seen),
                 len(missing))
        return out

    async def _take(self, items: dict[str, _Item], item: _Item, batch_id: str,
                    status: int | None, body: Any, why: str | None) -> list[Result]:
        if why is not None:
            self._unreserve(item)
            if any(code in why for code in _MISSING_CODES):
                self.counters["lines_expired"] += 1
                return []
            if status is not None and status < 500 and status not in _RETRYABLE:
                self.counters["lines_failed"] += 1
                return [self._final(items, item, "bad_request", why)]  # a bad request stays bad
            # A line the server failed (5xx, 408, ...) or rate limited; else the batch lost it.
            kind: ErrorKind = ("rate_limit" if status == 429
                               else "server" if status is not None else "batch")
            return self._failed(items, item, kind, why)
        choices = [c for c in body.get("choices") or [] if isinstance(c, dict)]
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        prompt = usage.get("prompt_tokens")
        prompt = prompt if isinstance(prompt, int) else estimate_prompt_tokens(item.job.messages)
        completion = usage.get("completion_tokens")
        completion = completion if isinstance(completion, int) else sum(
            estimate_choice_tokens(c) for c in choices)
        await self.budget.settle(item.reserved, prompt, completion)
        item.reserved = 0.0
        item.carried[0] += prompt
        item.carried[1] += completion
        if not choices:
            return self._failed(items, item, "empty", "empty response: no choices")
        read = read_choice(self.cfg, item.job, choices[0])
        if read.policy == "retry":
            item.reseed += 1
            return self._failed(items, item, read.kind or "other", retry_note(read))
        comp = Completion(text=read.text, reasoning=read.reasoning,
                          finish_reason=read.finish_reason, prompt_tokens=item.carried[0],
                          completion_tokens=item.carried[1])
        if read.policy == "drop":
            comp.fail("dropped", read.error)
        extra: dict[str, Any] = {"batch": batch_id,
                                 "price_factor": self.cfg.batch_price_factor}
        if item.attempts:
            extra["attempts"] = item.attempts + 1
        if not usage:
            extra["usage_estimated"] = True
        if served := served_model(body):
            extra["served_model"] = served
        if read.parsed is not None:
            extra["parsed"] = read.parsed
        comp.extra = extra
        if item.job.params.top_logprobs > 0:
            comp.top_logprobs = read.top_logprobs
            if comp.top_logprobs is None:
                self._no_logprobs()
        del items[item.cid]
        return [(item.job, item.sample, comp)]

    def _failed(self, items: dict[str, _Item], item: _Item, kind: ErrorKind, why: str
                ) -> list[Result]:
        """A line that came back from a batch without a completion to keep."""
        self.counters["lines_failed"] += 1
        return self._some(self._retry(items, item, kind, why))

    def _retry(self, items: dict[str, _Item], item: _Item, kind: ErrorKind, why: str
               ) -> Result | None:
        """Count a failed attempt: the item stays queued (`stream` sends it in a follow-up batch
        or online), or ends as an error row when its retries are spent."""
        item.attempts += 1
        item.last_error = why
        if item.attempts > self.cfg.max_retries:
            return self._final(items, item, kind,
                               f"{why} (gave up after {item.attempts} attempts)")
        return None

    @staticmethod
    def _some(result: Result | None) -> list[Result]:
        return [] if result is None else [result]

    def _final(self, items: dict[str, _Item], item: _Item, kind: ErrorKind, why: str
               ) -> Result:
        items.pop(item.cid, None)
        self._unreserve(item)
        comp = Completion.failed(kind, why, prompt_tokens=item.carried[0],
                                 completion_tokens=item.carried[1])
        if any(item.carried):
            comp.extra = {"price_factor": self.cfg.batch_price_factor}
        return item.job, item.sample, comp

    def _unreserve(self, item: _Item) -> None:
        self.budget.reserved = max(0.0, self.budget.reserved - item.reserved)
        item.reserved = 0.0

    def _no_logprobs(self) -> None:
        self.logprobs_missing += 1
        if self.require_logprobs and self._fatal is None:
            self._fatal = ("missing_logprobs", NO_LOGPROBS)
            log.error("batch teacher: %s; submitting nothing more", NO_LOGPROBS)
        elif not self.require_logprobs and self.logprobs_missing == 1:
            log.warning("batch teacher: %s", NO_LOGPROBS)

    async def _online(self, pending: list[_Item]) -> AsyncIterator[Result]:
        """Lines whose batches are spent (`batch_follow_ups`) go through the online client, at
        the full price, with its own retries (`max_retries`)."""
        self.counters["lines_online"] += len(pending)
        teacher = OpenAITeacher(self.cfg, require_logprobs=self.require_logprobs,
                                **self.online_options)
        teacher.budget.spent = self.budget.spent  # one max_cost_usd for the whole run
        jobs = [it.job.pending([it.sample]) for it in pending]
        try:
            async for job, s, comp in teacher.stream(jobs):
                yield job, s, comp
        finally:
            await teacher.aclose()
        self.budget.spent = teacher.budget.spent


def _batch_errors(batch: Any) -> str | None:
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    texts = [f"{e.code or 'error'}: {e.message or ''}" for e in errors]
    if not texts:
        return None
    return f"batch {batch.status}: " + "; ".join(texts)[:240]
