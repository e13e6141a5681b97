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
                      index=next(self._counter), port=self.port, at=time.monotonic())
        with self._lock:
            self.counts[req.path] = self.counts.get(req.path, 0) + 1
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
            try:
                return self.handler(req)
            except Exception as err:  # noqa: BLE001 - a broken script is a 500, visibly
                return Reply(status=500, body=error_body(f"handler failed: {err!r}"))
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
