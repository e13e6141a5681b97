"""The OpenAI Batch API as a teacher: the same `stream` protocol, at the batch discount.

    upload the JSONL (files, purpose "batch") → create the batch (24h window) → record its id
    → poll every `batch_poll_s` → download output and error files → completions

Every completion streams into the response cache as the output file is read, like the online
client's. What can go wrong, and what happens:

- killed after submission: the batch id is in `generate/batches.json` (written atomically the
  moment the provider returns it; a tag in the batch metadata covers the instant between). The
  rerun polls that batch for the samples the cache still lacks and submits nothing again.
- the answer to a batch creation is lost (a timeout, a reset connection, a 5xx after the
  provider created it): before creating again, the provider's batches are searched for the tag;
  one found is adopted (recorded and polled), and only when the list shows none is the same file
  submitted again (`max(2, max_retries) + 1` creations at most). When the list cannot be read
  either, nothing is created again: the lines end as error rows, the tag stays in the record and
  the rerun looks it up. An upload whose answer was lost is looked for by its name (the content's
  digest) before it is uploaded again, and a file stored whose batch was not created is used
  again; where the provider cannot list files, the uploads of the same lines whose answers were
  lost are bounded at `max(2, max_retries) + 1` in a process (then error rows). The SDK's own
  retries are off for these two calls: it would repeat the POST without asking.
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
    find_batches,
    find_file,
    make_line,
    parse_output_line,
    split_lines,
    upload_name,
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
ROUTES = ("batches_submitted", "batches_adopted", "batches_resumed", "polls", "lines_first_batch",
          "lines_follow_up", "lines_online", "lines_resumed", "lines_failed", "lines_expired")
"""`BatchTeacher.counters`. `batches_adopted`: of `batches_submitted`, those whose creation's
answer was lost, found on the provider by their tag. The lines each route sent, each line counted
once per send:
`lines_first_batch` (in a line's first batch), `lines_follow_up` (in a later batch),
`lines_online` (at the full price), `lines_resumed` (in batches an earlier process submitted,
polled here). Of those batch lines, `lines_failed` came back without a completion to keep and
`lines_expired` were not run (their batch expired or was cancelled)."""
_RETRYABLE = {408, 409, 425, 429}
_REFUSED = (400, 401, 403, 404, 422)
"""A create or upload answered with these was not acted on, and will not be if sent again."""


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


class _GiveUp(Exception):
    """These lines cannot go again safely (their batch may exist) or without storing yet another
    copy of the same file: they end as error rows; the rest of the job goes on."""


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
        self._tries = max(2, cfg.max_retries) + 1
        """Creations of one batch, uploads of one file, lookups after a lost answer."""
        self._stored: dict[str, str] = {}
        """{upload name: file id} of files stored whose batch was not created: used again."""
        self._unknown: dict[str, int] = {}
        """Per upload name, failed uploads the provider's file list could not rule out (each
        may have stored a copy)."""

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
                except _GiveUp as err:
                    log.error("batch: %s", err)
                    out += [self._final(items, items[ln.custom_id], "batch", str(err))
                            for ln in chunk]
                    continue
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
        data = b"".join(line.data for line in chunk)
        name = upload_name(data)
        file_id = await self._upload(name, data)
        intent = self.record.intend(file_id, [line.custom_id for line in chunk])
        batch, adopted = await self._create_batch(intent)
        self._stored.pop(name, None)
        rec = self.record.add(batch.id, intent, batch.status)
        self._waiting.update(line.custom_id for line in chunk)
        self.counters["batches_submitted"] += 1
        self.counters["batches_adopted"] += adopted
        for line in chunk:
            item = items[line.custom_id]
            self.counters["lines_follow_up" if item.batches else "lines_first_batch"] += 1
            item.batches += 1
        log.info("batch %s: submitted %d requests (%d bytes)", batch.id, len(chunk), len(data))
        return rec

    def _backoff(self, n: int) -> float:
        return min(self.cfg.batch_poll_s, 0.5 * 2 ** max(0, n - 1))

    async def _upload(self, name: str, data: bytes) -> str:
        """The id of the stored input file `data`: one stored before whose batch was not
        created, else uploaded (up to `_tries` times). An upload whose answer was lost is looked
        for by `name` before the next; when the provider cannot list files, such uploads (each
        may have stored a copy) are bounded per file for the process: `_tries`."""
        if name in self._stored:
            return self._stored[name]
        client = self._client.with_options(max_retries=0)  # the SDK would not look first
        failure: Exception | None = None
        for n in range(self._tries):
            if n:
                await asyncio.sleep(self._backoff(n))
            if self._unknown.get(name, 0) >= self._tries:
                raise _GiveUp(f"batch upload failed with no answer {self._unknown[name]} times "
                              f"(last: {_describe(failure)}) and the provider lists no files; "
                              f"not uploading the same lines again"[:300])
            try:
                upload = await client.files.create(file=(name, data, "application/jsonl"),
                                                   purpose="batch")
                self._stored[name] = str(upload.id)
                return self._stored[name]
            except Exception as err:  # noqa: BLE001 - it may be stored even so: look
                if (fatal := _refusal(err)) is not None:
                    raise fatal from None
                failure = err
            try:
                found = await find_file(client, name, len(data))
            except Exception as err:  # noqa: BLE001 - then that upload may have stored a copy
                log.debug("batch: listing files failed (%s)", _describe(err))
                self._unknown[name] = self._unknown.get(name, 0) + 1
                found = None
            if found is not None:
                log.warning("batch: upload %s stored though its answer was lost (%s); using it",
                            found, _describe(failure))
                self._stored[name] = found
                return found
            log.warning("batch: upload failed (%s)", _describe(failure))
        assert failure is not None
        raise failure

    async def _create_batch(self, intent: dict[str, Any]) -> tuple[Any, bool]:
        """(the batch of `intent`, whether it was adopted): created, or found by its tag when a
        creation's answer was lost. Created again (up to `_tries` creations) only when the
        provider's list shows no such batch; when the list cannot be read, never."""
        client = self._client.with_options(max_retries=0)  # the SDK would not look first
        creates = unknown = 0
        failure: Exception | None = None
        while True:
            if failure is not None:  # did the failed creation create it?
                await asyncio.sleep(self._backoff(creates + unknown))
                try:
                    found = (await find_batches(client, [intent["tag"]])).get(intent["tag"])
                except Exception as err:  # noqa: BLE001 - unknown: ask again, create nothing
                    unknown += 1
                    log.warning("batch: listing batches failed (%s) after a failed creation",
                                _describe(err))
                    if unknown < self._tries:
                        continue
                    raise _GiveUp(
                        f"batch submission unconfirmed: creating it failed "
                        f"({_describe(failure)}) and the provider's batches could not be "
                        f"listed ({_describe(err)}); not sent again, so as not to pay twice "
                        f"(a rerun looks its tag up)"[:400]) from None
                if found is not None:
                    log.warning("batch %s: created though its answer was lost (%s); adopted, "
                                "not submitted again", found.id, _describe(failure))
                    return found, True
                if creates >= self._tries:
                    self.record.drop_intent(intent)
                    raise failure
                log.warning("batch: creating it failed (%s) and the provider has no such "
                            "batch; creating it again", _describe(failure))
            creates += 1
            try:
                batch = await client.batches.create(
                    input_file_id=intent["input_file_id"], endpoint="/v1/chat/completions",
                    completion_window="24h", metadata={"distill_tag": intent["tag"]})
                return batch, False
            except Exception as err:  # noqa: BLE001 - it may be created even so: look
                if (fatal := _refusal(err)) is not None:
                    self.record.drop_intent(intent)
                    raise fatal from None
                failure = err

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


def _refusal(err: Exception) -> _Fatal | None:
    """The `_Fatal` for an answer refusing the request (not acted on, nor ever going to be)."""
    import openai

    if isinstance(err, openai.APIStatusError) and err.status_code in _REFUSED:
        return _Fatal(status_kind(err.status_code),
                      f"HTTP {err.status_code}: {err.message}"[:300])
    return None


def _describe(err: BaseException | None) -> str:
    return f"{type(err).__name__}: {err}"[:200] if err is not None else "none"


def _batch_errors(batch: Any) -> str | None:
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    texts = [f"{e.code or 'error'}: {e.message or ''}" for e in errors]
    if not texts:
        return None
    return f"batch {batch.status}: " + "; ".join(texts)[:240]
