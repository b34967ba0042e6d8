"""Kill -9 at random points of a busy workload: no acknowledged change is lost, and the
chain and the projections come back identical after restart.

Each case runs `TRIALS_PER_CASE` trials against one data directory. A trial starts a
real ``tailledger serve`` on what the previous trial left, checks that the restarted
server answers exactly as a fresh fold of the log, puts it under load and kills it with
SIGKILL at a random moment:

* admin clients over the admin socket create and rename users, create pre-auth keys,
  rename and tag nodes, and set policies (some large enough to make SQLite checkpoint
  its WAL now and then);
* simulated nodes register over the real control protocol with a pre-auth key.

A change counts as acknowledged when its answer arrived: the admin reply said ok, or
the register response authorised the machine. After the kill `check_log` proves that
every acknowledged change is in the log, the chain verifies (``tailledger log verify``),
no row is partial, and the checkpoint the server saved is a fresh fold of the log up to
its sequence number (checkpoint + tail = fold from zero). About one trial in ten kills
the server while it starts instead (late in its start-up: opening the log, folding the
backlog, writing its checkpoint).

The trial count and outcome are printed in the terminal summary (``conftest.py``).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2.exceptions
import msgspec
import pytest
import trio

from eventlog import AppendRequest, SQLiteEventStore
from eventlog.events import UserCreated
from eventlog.signing import load_or_create_signing_key
from projections import CheckpointStore, TailnetState, fold
from protocol import open_control_client
from protocol.errors import ProtocolError
from tests.conftest import ADMIN
from tests.protocol.control_harness import SimNode

from .conftest import TrialRecord
from .harness import (
    ServerProcess,
    Signature,
    admin,
    admin_rows,
    check_log,
    signature,
    signing_key_path,
    start_server,
    wait_ready,
)

pytestmark = pytest.mark.reliability

CASES = 10
TRIALS_PER_CASE = 10

#: Errors a client sees when the server dies under it (the change is not acknowledged).
_DEAD_SERVER = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError,
                h2.exceptions.ProtocolError)


def _policy(tag: str, n: int, padding: int) -> str:
    return (
        f"// policy {n} of {tag}\n// {'p' * padding}\n"
        '{"tagOwners": {"tag:ci": ["owner@"], "tag:web": ["owner@"]},\n'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}\n'
    )


@dataclass
class Workload:
    """One trial's load on one server, and what it got acknowledged."""

    server: ServerProcess
    rng: random.Random
    tag: str
    auth_key: str
    state: TailnetState  # the tailnet as the trial found it
    killed: trio.Event = field(default_factory=trio.Event)
    acked: list[Signature] = field(default_factory=list)
    counter: int = 0

    def next_name(self, kind: str) -> str:
        self.counter += 1
        return f"{self.tag}-{kind}{self.counter}"

    async def call(self, op: str, args: dict[str, object]) -> dict[str, object] | None:
        """An admin call; ``None`` when the server died first (not acknowledged)."""
        try:
            reply = await admin(self.server.admin_socket, op, args)
        except _DEAD_SERVER:
            if self.killed.is_set() or self.server.proc.poll() is not None:
                return None
            raise
        assert reply.get("ok"), f"{op} {args} refused: {reply}"
        result = reply["result"]
        assert isinstance(result, dict)
        return result

    async def users(self) -> None:
        mine: list[tuple[int, str]] = []
        while True:
            if mine and self.rng.random() < 0.4:
                i = self.rng.randrange(len(mine))
                uid, old = mine[i]
                new = self.next_name("r")
                if (r := await self.call("users.rename", {"user": old, "new_name": new})) is None:
                    return
                self.acked.append(signature("user.renamed", {"user_id": r["id"], "name": new}))
                mine[i] = (uid, new)
            else:
                name = self.next_name("u")
                if (r := await self.call("users.create", {"name": name})) is None:
                    return
                assert isinstance(r["id"], int)
                self.acked.append(signature("user.created", {"user_id": r["id"], "name": name}))
                mine.append((r["id"], name))

    async def keys(self) -> None:
        while True:
            args = {"user": "owner", "reusable": self.rng.random() < 0.5, "expiration_seconds": 86400}
            if (r := await self.call("preauthkeys.create", args)) is None:
                return
            self.acked.append(signature("preauthkey.created", {"key_id": r["id"], "prefix": r["prefix"]}))

    async def policies(self) -> None:
        while True:
            self.counter += 1
            text = _policy(self.tag, self.counter, self.rng.choice([0, 100, 3000, 12000]))
            if (r := await self.call("policy.set", {"text": text})) is None:
                return
            assert r["changed"] and isinstance(r["seq"], int)
            self.acked.append(signature("policy.set", {"sha256": r["sha256"]}, r["seq"]))

    async def nodes(self) -> None:
        tags = {n.id: n.tags for n in self.state.nodes.values()}
        if not tags:
            return
        while True:
            node_id = self.rng.choice(sorted(tags))
            if self.rng.random() < 0.5:
                name = self.next_name("n")
                if (await self.call("nodes.rename", {"node": str(node_id), "new_name": name})) is None:
                    return
                self.acked.append(signature("node.renamed", {"node_id": node_id, "given_name": name}))
            else:
                new = ("tag:ci",) if tags[node_id] != ("tag:ci",) else ("tag:ci", "tag:web")
                if (await self.call("nodes.tag", {"node": str(node_id), "tags": list(new)})) is None:
                    return
                self.acked.append(signature("node.tags_set", {"node_id": node_id, "tags": new}))
                tags[node_id] = new

    async def registrations(self) -> None:
        while True:
            node = SimNode.new(self.next_name("h"))
            try:
                async with open_control_client(
                    "127.0.0.1", self.server.port, machine_key=node.machine_private
                ) as client:
                    resp = await client.register(node.register_request(self.auth_key))
            except _DEAD_SERVER:
                if self.killed.is_set() or self.server.proc.poll() is not None:
                    return
                raise
            assert resp.error == "" and resp.machine_authorized, resp
            self.acked.append(signature("node.registered", {"machine_key": node.machine_key_hex}))


async def _check_live_views(server: ServerProcess, state: TailnetState) -> None:
    """The restarted server's projection answers exactly as a fresh fold of the log."""
    head = await admin(server.admin_socket, "log.head")
    assert head["ok"] and isinstance(head["result"], dict) and head["result"]["seq"] == state.seq

    def user_name(uid: int | None) -> str | None:
        user = state.users.get(uid) if uid is not None else None
        return user.name if user else None

    users = await admin_rows(server.admin_socket, "users.list")
    assert [(u["id"], u["name"], u["display_name"], u["email"]) for u in users] == [
        (u.id, u.name, u.display_name, u.email) for u in sorted(state.users.values(), key=lambda u: u.id)
    ]
    nodes = await admin_rows(server.admin_socket, "nodes.list")
    assert [
        (n["id"], n["name"], n["hostname"], n["user"], n["ipv4"], n["ipv6"], n["tags"], n["machine_key"])
        for n in nodes
    ] == [
        (n.id, n.given_name, n.hostname, user_name(n.user_id) or str(n.user_id), n.ipv4, n.ipv6,
         list(n.tags), n.machine_key)
        for n in sorted(state.nodes.values(), key=lambda n: n.id)
    ]
    keys = await admin_rows(server.admin_socket, "preauthkeys.list")
    assert [(k["id"], k["prefix"], k["user"], k["reusable"], k["used"]) for k in keys] == [
        (k.id, k.prefix, user_name(k.user_id), k.reusable, bool(k.used_by))
        for k in sorted(state.preauth_keys.values(), key=lambda k: k.id)
    ]
    policy = (await admin(server.admin_socket, "policy.get"))["result"]
    assert isinstance(policy, dict)
    assert (policy["text"], policy["sha256"]) == (state.policy_text, state.policy_sha256)


async def _setup(server: ServerProcess) -> tuple[str, list[Signature]]:
    """The case's fixed part: an owner, a reusable key for the nodes, a first policy."""

    async def ok(op: str, args: dict[str, object]) -> dict[str, object]:
        reply = await admin(server.admin_socket, op, args)
        assert reply["ok"], reply
        assert isinstance(reply["result"], dict)
        return reply["result"]

    owner = await ok("users.create", {"name": "owner"})
    key = await ok("preauthkeys.create", {"user": "owner", "reusable": True, "expiration_seconds": 86400})
    policy = await ok("policy.set", {"text": _policy("setup", 0, 0)})
    assert isinstance(key["key"], str)
    return key["key"], [
        signature("user.created", {"user_id": owner["id"], "name": "owner"}),
        signature("preauthkey.created", {"key_id": key["id"], "prefix": key["prefix"]}),
        signature("policy.set", {"sha256": policy["sha256"]}, policy["seq"]),  # type: ignore[arg-type]
    ]


async def _busy_then_kill(work: Workload, delay: float) -> None:
    """Run every worker; SIGKILL the server after ``delay`` seconds; let the workers
    read what was already answered, then return."""
    tasks: list[Callable[[], Awaitable[None]]] = [
        work.users, work.users, work.keys, work.policies, work.nodes,
        work.registrations, work.registrations,
    ]
    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(task)
        await trio.sleep(delay)
        work.killed.set()
        work.server.kill()
        # The nursery exits once every worker has read what was answered before the
        # kill and then EOF, a reset or a refused connection.


@pytest.mark.parametrize("case", range(CASES))
async def test_kill_9_under_load_loses_nothing(
    case: int, tmp_path: Path, trial_records: list[TrialRecord]
) -> None:
    rng = random.Random(f"kill9-{case}")
    data = tmp_path / "data"
    data.mkdir()
    log_path = tmp_path / "serve.log"
    acked: list[Signature] = []
    auth_key = ""
    state = TailnetState()
    startup = 1.0  # how long a start takes here (measured by trial 0)
    for trial in range(TRIALS_PER_CASE):
        record = TrialRecord(case=case, trial=trial)
        trial_records.append(record)
        server = start_server(data, log_path=log_path)
        try:
            if trial > 0 and rng.random() < 0.1:
                # Killed while it starts: folding the backlog, saving its checkpoint.
                record.kind = "start-up"
                await trio.sleep(rng.uniform(0.5, 1.0) * startup)
                server.kill()
            else:
                started = trio.current_time()
                await wait_ready(server)
                if trial == 0:
                    startup = trio.current_time() - started
                await _check_live_views(server, state)
                if trial == 0:
                    auth_key, setup_acked = await _setup(server)
                    acked.extend(setup_acked)
                work = Workload(server, rng, f"c{case}t{trial}", auth_key, state)
                with trio.fail_after(60):
                    await _busy_then_kill(work, rng.uniform(0.05, 0.6))
                acked.extend(work.acked)
                record.acked = len(work.acked)
            check = check_log(data, acked, signing_key=signing_key_path(data))
        except BaseException as exc:
            record.failure = f"{type(exc).__name__}: {exc}"[:500]
            raise
        finally:
            server.kill()
        state = check.state
        record.head = check.head
        record.checkpoint_seq = check.checkpoint_seq
        record.ok = True

    # Last: one more restart, a clean stop, and the real command on the final log.
    server = start_server(data, log_path=log_path)
    try:
        await wait_ready(server)
        await _check_live_views(server, state)
    finally:
        assert server.stop() == 0, server.log_text()[-4000:]
    verify = server.cli("log", "verify")
    assert verify.returncode == 0 and "chain intact" in verify.stdout, verify
    final = check_log(data, acked, signing_key=signing_key_path(data))
    assert final.checkpoint_seq == final.head == state.seq


def test_the_oracle_catches_a_lost_change_and_a_bad_checkpoint(tmp_path: Path) -> None:
    """`check_log` itself: it fails on a missing acknowledged change, on a checkpoint
    that is not a fresh fold, and on a checkpoint the log no longer matches."""
    data = tmp_path / "data"
    data.mkdir()
    store = SQLiteEventStore(data / "ledger.db")
    created = [UserCreated(user_id=i, name=f"u{i}") for i in (1, 2, 3)]
    [recorded] = store.append_batch([AppendRequest(events=tuple(created), actor=ADMIN)], 1)
    store.close()
    assert not isinstance(recorded, BaseException)
    acked = [signature("user.created", {"user_id": e.user_id, "name": e.name}) for e in created]
    assert check_log(data, acked).head == 3

    lost = signature("user.created", {"user_id": 4, "name": "u4"})
    with pytest.raises(AssertionError, match="1 acknowledged change"):
        check_log(data, [*acked, lost])

    upto2, _ = fold(TailnetState(), recorded[:2])
    checkpoints = CheckpointStore(data / "checkpoints.db")
    try:
        checkpoints.save("tailnet", upto2, recorded[1].hash)
        assert check_log(data, acked).checkpoint_seq == 2
        checkpoints.save("tailnet", msgspec.structs.replace(upto2, next_user_id=9), recorded[1].hash)
        with pytest.raises(AssertionError, match="differs from a fresh fold"):
            check_log(data, acked)
        checkpoints.save("tailnet", upto2, recorded[2].hash)  # as if event 2 had changed
        with pytest.raises(AssertionError, match="no longer matches the log"):
            check_log(data, acked)
    finally:
        checkpoints.close()


def test_the_oracle_checks_signed_checkpoints_with_the_servers_key(tmp_path: Path) -> None:
    """`check_log` verifies the signed checkpoints with the key the server signed with,
    whatever key this machine's default location (``/etc/tailledger/signing.key`` for
    root) holds: a head signed by another key is a failure, the server's own passes."""
    data = tmp_path / "data"
    data.mkdir()
    store = SQLiteEventStore(data / "ledger.db")
    created = [UserCreated(user_id=i, name=f"u{i}") for i in (1, 2)]
    [recorded] = store.append_batch([AppendRequest(events=tuple(created), actor=ADMIN)], 1)
    assert not isinstance(recorded, BaseException)
    signer, _ = load_or_create_signing_key(signing_key_path(data))
    head = store.head()
    store.add_signed_checkpoint(signer.sign(n=1, seq=head.seq, hash=head.hash, at=recorded[-1].recorded_at, prev=""))
    store.close()
    acked = [signature("user.created", {"user_id": e.user_id, "name": e.name}) for e in created]

    assert check_log(data, acked, signing_key=signing_key_path(data)).head == 2
    load_or_create_signing_key(tmp_path / "other-signing.key")
    with pytest.raises(AssertionError, match="does not verify against the public key"):
        check_log(data, acked, signing_key=tmp_path / "other-signing.key")
