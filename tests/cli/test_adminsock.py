"""The admin socket in process: an operation that fails with anything but a refusal
answers an internal error on its connection alone, logs its traceback, and the
server goes on serving."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pytest
import trio

from cli.adminsock import AdminError, call
from eventlog import Actor
from tests.protocol.control_harness import running


async def test_a_broken_operation_fails_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running(tmp_path) as server:

        async def broken(raw: dict[str, object], actor: Actor) -> object:
            raise RuntimeError("disk on fire")

        server.ops.register("test.broken", broken)
        sock = server.config.admin_socket_path
        with caplog.at_level(logging.ERROR, logger="cli.adminsock"):
            for _ in range(2):
                with pytest.raises(AdminError, match=r"internal error in 'test.broken': RuntimeError: disk on fire"):
                    await trio.to_thread.run_sync(partial(call, sock, "test.broken"))
        assert await trio.to_thread.run_sync(partial(call, sock, "users.list")) == []
        [record, _] = [r for r in caplog.records if "test.broken" in r.getMessage()]
        assert record.exc_info is not None
        assert "disk on fire" in caplog.text


async def test_a_value_error_of_an_operation_is_not_blamed_on_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path) as server:

        async def buggy(raw: dict[str, object], actor: Actor) -> object:
            raise ValueError("bad arithmetic")

        server.ops.register("test.buggy", buggy)
        sock = server.config.admin_socket_path
        with caplog.at_level(logging.ERROR, logger="cli.adminsock"), pytest.raises(
            AdminError, match=r"internal error in 'test.buggy': ValueError: bad arithmetic"
        ):
            await trio.to_thread.run_sync(partial(call, sock, "test.buggy"))
        assert any(r.exc_info is not None and "test.buggy" in r.getMessage() for r in caplog.records)
        with pytest.raises(AdminError, match="--reason: the reason must be one line"):
            await trio.to_thread.run_sync(partial(call, sock, "users.list", reason="two\nlines"))
