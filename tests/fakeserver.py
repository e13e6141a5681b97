"""A loopback OpenAI-compatible server for tests and benchmarks: real sockets, scripted replies.

    with FakeServer() as server:                       # default: a well-formed chat completion
        teacher = OpenAITeacher(TeacherConfig(backend="openai", base_url=server.url, ...))
    server.chat_count                                   # chat requests it saw

A handler maps each request to a `Reply`; a reply can carry any fault a real endpoint produces:
a status with headers (429 + Retry-After, 500, 503), a delay (timeouts), a dropped connection,
a malformed body, or any chat body (empty choices, `finish_reason`, reasoning, logprobs, usage).
`python tests/fakeserver.py --latency 0.05` serves in its own process (the benchmark uses that).

HTTP/1.1 with keep-alive over asyncio streams, in a background thread with its own event loop,
so sync tests, `asyncio.run` tests and subprocesses can all talk to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable"}


@dataclass
class Request:
    """What the server saw: one HTTP request."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    index: int
    """0-based arrival order among all requests to this server."""
    port: int = 0
    at: float = 0.0
    """time.monotonic() when the request arrived."""
    raw: bytes = b""
    """The body as sent (multipart uploads are not JSON)."""

    @property
    def prompt(self) -> str:
        """The last user message (tests key their scripts on it)."""
        msgs = (self.body or {}).get("messages") or [{}]
        return str(msgs[-1].get("content", ""))

    @property
    def n(self) -> int:
        return int((self.body or {}).get("n") or 1)


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    """A dict/list is sent as JSON; str/bytes are sent verbatim (malformed bodies)."""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    """Close the connection without answering (after `delay`)."""


Handler = Callable[[Request], Reply]


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def chat_body(req: Request, texts: list[str] | None = None, *, finish_reason: str = "stop",
              reasoning: str | None = None, reasoning_field: str = "reasoning_content",
              usage: dict[str, int] | None | bool = True, n: int | None = None) -> dict[str, Any]:
    """A well-formed chat.completion for `req`: one choice per requested sample by default."""
    n = req.n if n is None else n
    if texts is None:
        seed = (req.body or {}).get("seed")
        texts = [f"echo: {req.prompt} [seed={seed} choice={i}]" for i in range(n)]
    want_lp = bool((req.body or {}).get("logprobs"))
    k = int((req.body or {}).get("top_logprobs") or 0)
    choices = []
    for i, text in enumerate(texts):
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            message[reasoning_field] = reasoning
        choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish_reason,
                                  "logprobs": None}
        if want_lp and text:
            choice["logprobs"] = {"content": [_token_logprobs(tok, k) for tok in text.split(" ")]}
        choices.append(choice)
    body: dict[str, Any] = {"id": f"chatcmpl-{req.index}", "object": "chat.completion",
                            "created": int(time.time()), "model": (req.body or {}).get("model"),
                            "choices": choices}
    if usage is True:
        prompt = sum(estimate_tokens(str(m.get("content", "")))
                     for m in (req.body or {}).get("messages", []))
        completion = sum(estimate_tokens(t) + estimate_tokens(reasoning or "") for t in texts)
        body["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}
    elif isinstance(usage, dict):
        body["usage"] = usage
    return body


def _token_logprobs(token: str, k: int) -> dict[str, Any]:
    top = [{"token": token if j == 0 else f"{token}~{j}", "logprob": -0.1 - j, "bytes": None}
           for j in range(k)]
    return {"token": token, "logprob": -0.1, "bytes": None, "top_logprobs": top}


def ok(req: Request) -> Reply:
    return Reply(body=chat_body(req))


def error_body(message: str, *, type_: str = "server_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class FakeServer:
    """Serve `handler` on 127.0.0.1:`port` (0 picks a free port) until `stop()`."""

    def __init__(self, handler: Handler | None = None, *, latency: float = 0.0,
                 models: tuple[str, ...] = ("fake-model",), port: int = 0,
                 record: bool = True) -> None:
        self.handler: Handler = handler or ok
        self.latency = latency
        self.models = models
        self.port = port
        self.record = record
        self.requests: list[Request] = []
        self.counts: dict[str, int] = {}
        self.healthy = True
        """False makes GET /models answer 503 (a replica that is down for probes too)."""
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.window: list[float] = []
        """[count, first, last] arrival time (monotonic) of chat requests since the last
        `POST /stats/reset` (kept even when not recording): a client's steady-state rate."""
        self.batch = FakeBatchAPI(self)
        """The Batch API (files, batches): see `FakeBatchAPI`."""

    # lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._open())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fakeserver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        with contextlib.suppress(Exception):
            fut.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._loop = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what it saw -----------------------------------------------------------------------------
    @property
    def chat_count(self) -> int:
        return self.counts.get("/v1/chat/completions", 0)

    def chat_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def answer(self, req: Request) -> Reply:
        """The handler's reply to a chat request (online, or one line of a batch)."""
        try:
            return self.handler(req)
        except Exception as err:  # noqa: BLE001 - a broken script is a 500, visibly
            return Reply(status=500, body=error_body(f"handler failed: {err!r}"))

    def next_index(self) -> int:
        return next(self._counter)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.counts.clear()

    # HTTP ------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                req = await self._read_request(reader)
                if req is None:
                    break
                reply = self._dispatch(req)
                delay = reply.delay + (self.latency if req.method == "POST" else 0.0)
                if delay:
                    await asyncio.sleep(delay)
                if reply.drop:
                    writer.transport.abort()
                    break
                writer.write(_encode(reply))
                await writer.drain()
                if req.headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        line = await reader.readline()
        if not line.strip():
            return None
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        req = Request(method=method, path=target.split("?")[0], headers=headers, body=body,
                      index=next(self._counter), port=self.port, at=time.monotonic(), raw=raw)
        with self._lock:
            self.counts[req.path] = self.counts.get(req.path, 0) + 1
            if req.path.endswith("/chat/completions"):
                w = self.window
                self.window = [w[0] + 1, w[1], req.at] if w else [1, req.at, req.at]
            if self.record:
                self.requests.append(req)
        return req

    def _dispatch(self, req: Request) -> Reply:
        if req.method == "GET" and req.path.endswith("/models"):
            if not self.healthy:
                return Reply(status=503, body=error_body("down"))
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                    for m in self.models]
            return Reply(body={"object": "list", "data": data})
        if req.method == "POST" and req.path.endswith("/chat/completions"):
            return self.answer(req)
        if req.path == "/stats":  # the benchmark's view: how fast chat requests arrived
            w = self.window
            if req.method == "POST":
                self.window = []
            return Reply(body={"chat": w[0], "first": w[1], "last": w[2]} if w else {"chat": 0})
        if "/files" in req.path or "/batches" in req.path:
            reply = self.batch.dispatch(req)
            if reply is not None:
                return reply
        return Reply(status=404, body=error_body(f"no route {req.method} {req.path}"))


def _encode(reply: Reply) -> bytes:
    if isinstance(reply.body, bytes):
        payload = reply.body
    elif isinstance(reply.body, str):
        payload = reply.body.encode()
    else:
        payload = json.dumps(reply.body if reply.body is not None else {}).encode()
    head = [f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Status')}",
            "Content-Type: application/json", f"Content-Length: {len(payload)}"]
    head += [f"{k}: {v}" for k, v in reply.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


# the Batch API -------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """How one batch (in creation order) behaves: `validating` for the first 30% of `after`
    seconds, then `in_progress`, then `outcome`. An expired or cancelled batch ran only the first
    `done_fraction` of its lines; the rest of an expired batch are `batch_expired` lines in its
    error file (as OpenAI writes them) unless `expired_lines` is False."""

    outcome: str = "completed"
    after: float = 0.0
    done_fraction: float = 1.0
    errors: list[dict[str, Any]] = field(default_factory=list)
    """batch.errors for a `failed` batch."""
    expired_lines: bool = True


class FakeBatchAPI:
    """Files (upload, content) and batches (create, retrieve, list, cancel) over the server's
    handler: each line of a batch is answered by `server.handler` as if sent online.

    `plans` script batches in creation order (then `default`); `created` lists the bodies of
    batch creations, `lines` the chat requests batches ran (what the account paid for).
    """

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.plans: list[BatchPlan] = []
        self.default = BatchPlan()
        self.max_requests = 50_000
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.lines: list[Request] = []
        self.statuses: dict[str, list[str]] = {}
        """Every status each batch was seen in by a retrieve, in order."""
        self._ids = itertools.count(1)

    def dispatch(self, req: Request) -> Reply | None:
        parts = req.path.rstrip("/").split("/")[2:]  # after /v1
        with self.server._lock:
            if parts == ["files"] and req.method == "POST":
                return self._upload(req)
            if len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
                f = self.files.get(parts[1])
                return Reply(body=f["data"]) if f else _not_found(parts[1])
            if parts == ["batches"] and req.method == "POST":
                return self._create(req)
            if parts == ["batches"] and req.method == "GET":
                data = [self._view(b) for b in reversed(list(self.batches.values()))]
                return Reply(body={"object": "list", "data": data, "has_more": False,
                                   "first_id": data[0]["id"] if data else None,
                                   "last_id": data[-1]["id"] if data else None})
            if len(parts) >= 2 and parts[0] == "batches":
                b = self.batches.get(parts[1])
                if b is None:
                    return _not_found(parts[1])
                if len(parts) == 3 and parts[2] == "cancel" and req.method == "POST":
                    b["cancel"] = True
                    return Reply(body=self._view(b, advance=False) | {"status": "cancelling"})
                view = self._view(b)
                self.statuses.setdefault(b["id"], []).append(view["status"])
                return Reply(body=view)
        return None

    def _upload(self, req: Request) -> Reply:
        fields = parse_multipart(req.raw, req.headers.get("content-type", ""))
        if "file" not in fields or fields.get("purpose", (b"", ""))[0] != b"batch":
            return Reply(400, error_body("expected a file with purpose batch",
                                         type_="invalid_request_error"))
        data, filename = fields["file"]
        fid = f"file-{next(self._ids)}"
        self.files[fid] = {"data": data, "purpose": "batch"}
        return Reply(body={"id": fid, "object": "file", "bytes": len(data),
                           "created_at": int(time.time()), "filename": filename or "upload",
                           "purpose": "batch", "status": "processed"})

    def _create(self, req: Request) -> Reply:
        body = req.body if isinstance(req.body, dict) else {}
        f = self.files.get(str(body.get("input_file_id")))
        if f is None:
            return _not_found(str(body.get("input_file_id")))
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return Reply(400, error_body("bad endpoint or completion_window",
                                         type_="invalid_request_error"))
        lines = [json.loads(x) for x in f["data"].splitlines() if x.strip()]
        ids = [x.get("custom_id") for x in lines]
        if len(set(ids)) != len(ids) or any(
                x.get("method") != "POST" or x.get("url") != body["endpoint"] for x in lines):
            return Reply(400, error_body("duplicate custom_id, or a line's method or url is "
                                         "wrong", type_="invalid_request_error"))
        if len(lines) > self.max_requests:
            return Reply(400, error_body(f"at most {self.max_requests} requests per batch",
                                         type_="invalid_request_error"))
        n = len(self.created)
        self.created.append(body)
        plan = self.plans[n] if n < len(self.plans) else self.default
        bid = f"batch_{next(self._ids)}"
        self.batches[bid] = {"id": bid, "plan": plan, "lines": lines, "t0": time.monotonic(),
                             "input_file_id": body["input_file_id"],
                             "metadata": body.get("metadata"), "final": None, "cancel": False}
        return Reply(body=self._view(self.batches[bid]))

    def _view(self, b: dict[str, Any], advance: bool = True) -> dict[str, Any]:
        plan: BatchPlan = b["plan"]
        elapsed = time.monotonic() - b["t0"]
        if b["final"] is None and advance and (elapsed >= plan.after or b["cancel"]):
            self._finish(b, "cancelled" if b["cancel"] else plan.outcome)
        if b["final"] is not None:
            status, out_id, err_id, counts = b["final"]
        else:
            status = "validating" if elapsed < 0.3 * plan.after else "in_progress"
            out_id = err_id = None
            counts = {"total": len(b["lines"]), "completed": 0, "failed": 0}
        return {"id": b["id"], "object": "batch", "endpoint": "/v1/chat/completions",
                "errors": ({"object": "list", "data": plan.errors}
                           if status == "failed" else None),
                "input_file_id": b["input_file_id"], "completion_window": "24h",
                "status": status, "output_file_id": out_id, "error_file_id": err_id,
                "created_at": int(time.time()), "request_counts": counts,
                "metadata": b["metadata"]}

    def _finish(self, b: dict[str, Any], status: str) -> None:
        plan: BatchPlan = b["plan"]
        lines = [] if status == "failed" else b["lines"]
        if status in ("expired", "cancelled"):
            lines = lines[: int(len(lines) * plan.done_fraction)]
        out, err = [], []
        for line in lines:
            req = Request(method="POST", path="/v1/chat/completions", headers={},
                          body=line["body"], index=self.server.next_index())
            self.lines.append(req)
            reply = self.server.answer(req)
            if reply.drop:
                err.append({"id": f"br-{req.index}", "custom_id": line["custom_id"],
                            "response": None,
                            "error": {"code": "server_error", "message": "connection lost"}})
                continue
            target = out if reply.status == 200 else err
            target.append({"id": f"br-{req.index}", "custom_id": line["custom_id"],
                           "response": {"status_code": reply.status,
                                        "request_id": f"req-{req.index}", "body": reply.body},
                           "error": None})
        if status == "expired" and plan.expired_lines:
            err += [{"id": f"br-x{i}", "custom_id": line["custom_id"], "response": None,
                     "error": {"code": "batch_expired", "message": "not executed before the "
                               "completion window expired"}}
                    for i, line in enumerate(b["lines"][len(lines):])]
        out_id = self._store(out)
        err_id = self._store(err)
        counts = {"total": len(b["lines"]), "completed": len(out), "failed": len(err)}
        b["final"] = (status, out_id, err_id, counts)

    def _store(self, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        fid = f"file-{next(self._ids)}"
        self.files[fid] = {"data": "".join(json.dumps(x) + "\n" for x in lines).encode(),
                           "purpose": "batch_output"}
        return fid


def _not_found(what: str) -> Reply:
    return Reply(404, error_body(f"no such object: {what}", type_="invalid_request_error"))


def parse_multipart(raw: bytes, content_type: str) -> dict[str, tuple[bytes, str | None]]:
    """{field name: (value, filename)} of a multipart/form-data body."""
    boundary = content_type.partition("boundary=")[2].strip().strip('"').encode()
    out: dict[str, tuple[bytes, str | None]] = {}
    if not boundary:
        return out
    for part in raw.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        part = part.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, _, value = part.partition(b"\r\n\r\n")
        disposition = head.decode("latin-1")
        name = disposition.partition('name="')[2].partition('"')[0]
        filename = disposition.partition('filename="')[2].partition('"')[0] or None
        out[name] = (value, filename)
    return out


# scripted faults -----------------------------------------------------------------------------
def first_n(n: int, fault: Reply | Callable[[Request], Reply], then: Handler = ok) -> Handler:
    """The first `n` chat requests get `fault`, the rest `then`."""
    seen = itertools.count()
    lock = threading.Lock()

    def handler(req: Request) -> Reply:
        with lock:
            i = next(seen)
        if i < n:
            return fault(req) if callable(fault) else fault
        return then(req)

    return handler


def per_prompt(fail_times: int, fault: Reply | Callable[[Request], Reply],
               then: Handler = ok) -> Handler:
    """Each distinct prompt fails `fail_times` times before `then` answers it."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def handler(req: Request) -> Reply:
        with lock:
            i = seen.get(req.prompt, 0)
            seen[req.prompt] = i + 1
        if i < fail_times:
            return fault(req) if callable(fault) else fault
        return then(req)

    return handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeServer(latency=args.latency, port=args.port, record=False).start()
    print(f"PORT {server.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
