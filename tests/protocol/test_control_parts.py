"""The parts of ``protocol.control`` on their own: a park carries its keep-alive time to
the map streams' wake groups, and the handler lets go of what it subscribed to."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from eventlog import EventLog, SQLiteEventStore
from projections import ProjectionRunner, Tailnet
from projections.netmap import NetmapSettings
from projections.presence import PresenceTable
from projections.tailcfg import DERPMap
from protocol import Park, keepalive_frame
from protocol.control import Control, ControlSettings
from protocol.control.streams import MapStreams, _MapPark
from tests.support.builders import PLAN

from .control_harness import running

SETTINGS = ControlSettings(
    public_url="https://control.example",
    plan=PLAN,
    netmap=NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={})),
)


def _tailnet(tmp_path: Path) -> Tailnet:
    log = EventLog(SQLiteEventStore(tmp_path / "log.db"))
    return Tailnet(log, ProjectionRunner(log))


def test_a_park_hands_itself_and_the_resume_to_its_owner() -> None:
    got: list[tuple[float, Callable[[], None]]] = []
    resumed: list[str] = []

    def owner(park: Park, resume: Callable[[], None]) -> None:
        got.append((park.due, resume))

    Park(owner, due=12.5).register(lambda: resumed.append("a"))
    Park(owner).register(lambda: resumed.append("b"))
    assert [due for due, _ in got] == [12.5, float("inf")]  # no due: only when woken
    for _, resume in got:
        resume()
    assert resumed == ["a", "b"]


def _park(streams: MapStreams, group: int, due: float, *, compress: bool = True) -> _MapPark:
    """What a map stream of ``group`` yields when it parks."""
    return _MapPark(streams._park_owners[group], due, compress=compress, last_sent=due - 1)


def test_the_keepalive_ticker_resumes_only_the_parks_that_are_due(tmp_path: Path) -> None:
    control = Control(_tailnet(tmp_path), PresenceTable(), SETTINGS)
    streams = control.streams
    resumed: list[str] = []
    # Two streams of group 3 park with different keep-alive times (what each stream
    # yields: a Park of its group's owner carrying its due time); a transport with
    # no send_now: the ticker resumes the stream, which sends its keep-alive itself.
    _park(streams, 3, 10.0).register(lambda: resumed.append("soon"))
    _park(streams, 3, 50.0).register(lambda: resumed.append("later"))
    _park(streams, 4, 1.0).register(lambda: resumed.append("other group"))
    streams._wake_group(3, due_by=20.0)
    assert resumed == ["soon"]
    streams._wake_group(3, due_by=20.0)  # woken once: it is no longer parked
    assert resumed == ["soon"]
    streams._wake_group(3)  # a publication wakes the whole group, due or not
    assert resumed == ["soon", "later"]
    control.close()


async def test_the_keepalive_ticker_sends_through_the_transport_and_leaves_the_stream_parked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A due park whose transport can send at once (``send_now``) gets the shared
    keep-alive frame there and stays parked, due again an interval later; one whose
    transport cannot (or fails) is resumed, to send it itself."""
    control = Control(_tailnet(tmp_path), PresenceTable(), SETTINGS)
    streams = control.streams
    resumed: list[str] = []
    sent: list[tuple[str, bytes]] = []

    def transport(name: str, answer: bool | None) -> Callable[[bytes], bool]:
        def send_now(data: bytes) -> bool:
            if answer is None:
                raise RuntimeError("transport bug (expected by the test)")
            if answer:
                sent.append((name, data))
            return answer

        return send_now

    now = trio.current_time()
    direct, raw = _park(streams, 5, now - 1), _park(streams, 5, now - 1, compress=False)
    direct.register(lambda: resumed.append("direct"), transport("direct", True))
    raw.register(lambda: resumed.append("raw"), transport("raw", True))
    _park(streams, 5, now - 1).register(lambda: resumed.append("busy"), transport("busy", False))
    _park(streams, 5, now - 1).register(lambda: resumed.append("broken"), transport("broken", None))
    _park(streams, 5, now + 100).register(lambda: resumed.append("not due"), transport("not due", True))
    streams._wake_group(5, due_by=now)
    assert sent == [("direct", keepalive_frame(True)), ("raw", keepalive_frame(False))]
    assert resumed == ["busy", "broken"]
    assert control.stats.keepalives_direct == 2
    # Still parked, their keep-alive sent now: due again after _keepalive_due().
    assert direct.last_sent == now and direct.due == now + streams._keepalive_due()
    assert [p.due for p in streams._parked[5]] == [direct.due, raw.due, now + 100]
    streams._wake_group(5, due_by=now + 1)  # not due again yet
    assert len(sent) == 2 and len(resumed) == 2
    streams._wake_group(5)  # a publication resumes them all
    assert resumed == ["busy", "broken", "direct", "raw", "not due"] and not streams._parked[5]
    control.close()


def test_close_ends_the_log_subscription_and_the_presence_watch(tmp_path: Path) -> None:
    tailnet = _tailnet(tmp_path)
    presence = PresenceTable()
    subscribers, watchers = len(tailnet.runner._subscribers), len(presence._watchers)
    control = Control(tailnet, presence, SETTINGS)
    assert len(tailnet.runner._subscribers) == subscribers + 1
    assert len(presence._watchers) == watchers + 1
    control.close()
    assert len(tailnet.runner._subscribers) == subscribers
    assert len(presence._watchers) == watchers
    control.close()  # idempotent
    assert len(tailnet.runner._subscribers) == subscribers


async def test_a_stopped_server_leaves_no_subscription_behind(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        assert server.control is not None and server.presence is not None
        presence = server.presence
        assert server.runner._subscribers and presence._watchers
    # The server closed its control handler (and every task its own subscriptions).
    assert not server.runner._subscribers
    assert not presence._watchers
