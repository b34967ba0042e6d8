"""Extra DNS records from the configuration or a watched JSON file, into the log.

``dns.extra_records`` (inline) or ``dns.extra_records_path`` (a JSON list, read at
start-up and again whenever it changes or the process gets SIGHUP) become
``dns.extra_records_set`` events when they differ from what the log records (actor
``system:dns-records``), so the replay knows which names resolved where. A file that
cannot be read or holds bad records stops the server at start-up; later, the records in
force stay and the problem is logged. The DNS configuration clients get follows the log
(:mod:`cli.dnsapply`).
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import trio

from eventlog import Actor, ActorKind
from eventlog.events import DnsExtraRecord
from projections import commands as c
from projections.errors import CommandError
from projections.service import Tailnet

from .config import Config, ConfigError

__all__ = ["DNS_RECORDS_ACTOR", "read_extra_records_file", "sync_extra_records"]

log = logging.getLogger("tailledger")

DNS_RECORDS_ACTOR = Actor(kind=ActorKind.SYSTEM, id="dns-records")


def read_extra_records_file(path: Path) -> tuple[DnsExtraRecord, ...]:
    """The records of a JSON file.

    Raises:
        CommandError: unreadable, not JSON, or a bad record (the message says which).
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise CommandError(f"dns.extra_records_path: cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"dns.extra_records_path: {path} is not JSON: {exc}") from None
    return c.parse_extra_records(raw, where=str(path))


async def _record(tailnet: Tailnet, records: tuple[DnsExtraRecord, ...], source: str) -> None:
    changed, _ = await tailnet.execute(
        lambda s: c.decide_set_extra_records(s, records, source=source), actor=DNS_RECORDS_ACTOR
    )
    if changed:
        log.info("extra DNS records from %s: %d record(s) now", source, len(records))


async def sync_extra_records(
    config: Config, tailnet: Tailnet, *, interval: float = 2.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Record the configured records now; with a file, follow it until cancelled.

    Raises:
        ConfigError: at start-up, the file is unusable.
    """
    dns = config.dns
    if not dns.extra_records_path:
        await _record(tailnet, c.parse_extra_records(dns.extra_records, where="dns.extra_records"), "config")
        task_status.started()
        return
    path = Path(dns.extra_records_path)
    try:
        records = await trio.to_thread.run_sync(read_extra_records_file, path)
    except CommandError as exc:
        raise ConfigError(str(exc)) from None
    await _record(tailnet, records, str(path))

    def stamp() -> tuple[float, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime, st.st_size

    last = stamp()
    reload = trio.Event()

    async def on_sighup() -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                reload.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_sighup)
        task_status.started()
        while True:
            with trio.move_on_after(interval):
                await reload.wait()
            forced, reload = reload.is_set(), trio.Event()
            now = stamp()
            if now == last and not forced:
                continue
            last = now
            try:
                records = await trio.to_thread.run_sync(read_extra_records_file, path)
                await _record(tailnet, records, str(path))
            except CommandError as exc:
                log.warning("extra DNS records not changed: %s", exc)
