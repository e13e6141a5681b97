"""pytest fixtures around `fakeserver.FakeServer` (this is not a conftest: import what you use).

    import fakeserver_fixture
    fake_server = fakeserver_fixture.fake_server      # then take `fake_server` as an argument
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakeserver import FakeServer, Handler  # noqa: E402


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """One loopback server answering well-formed completions; set `.handler` to script faults."""
    server = FakeServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_servers() -> Iterator[Callable[..., FakeServer]]:
    """A factory for several servers (replicas); all are stopped after the test."""
    started: list[FakeServer] = []

    def make(handler: Handler | None = None, **kwargs: object) -> FakeServer:
        server = FakeServer(handler, **kwargs).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()
