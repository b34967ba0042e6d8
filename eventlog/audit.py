"""Proving the log: the hash chain, the signed checkpoints and external anchors together.

:func:`audit_log` is what ``tailledger log verify`` and the server's start-up check run.
It reports the *first sequence number from which the log can no longer be proven*, and
why, for each way a log can be tampered with:

* an edited, removed or reordered event: the chain breaks there;
* a fully re-hashed history (the chain is consistent again): the hash at a signed
  checkpoint differs from the one signed; everything after the last checkpoint that
  still matches is unproven;
* a truncated tail: a signed checkpoint or an anchor names a sequence number past the
  head;
* a removed or altered signed checkpoint: a gap in their numbering, a broken ``prev``
  link, a signature that does not verify, or an anchor naming a checkpoint the table
  no longer holds.

Signatures are checked against a *trusted* public key given by the caller (the
configuration, ``--pubkey``, or the server's own key), never against the key a
checkpoint names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .envelope import GENESIS_HASH
from .signing import SignedCheckpoint
from .store import EventStore

__all__ = ["AuditProblem", "AuditReport", "audit_log"]


@dataclass(frozen=True, slots=True)
class AuditProblem:
    """One failed proof: from ``seq`` on the log cannot be trusted, for ``reason``."""

    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The outcome of :func:`audit_log`."""

    events: int  # events whose links were checked
    head_seq: int
    head_hash: str
    checkpoints: int  # signed checkpoints stored
    anchors: int  # anchors checked
    signatures_checked: bool  # False when no public key was available
    latest: SignedCheckpoint | None  # the newest checkpoint that verified
    problems: tuple[AuditProblem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> int | None:
        return min(p.seq for p in self.problems) if self.problems else None

    @property
    def reason(self) -> str | None:
        if not self.problems:
            return None
        return min(self.problems, key=lambda p: p.seq).reason


def _check_checkpoints(
    checkpoints: Sequence[SignedCheckpoint], public_key: str | None, problems: list[AuditProblem]
) -> list[SignedCheckpoint]:
    """Numbering, links and signatures; returns those that are trustworthy."""
    good: list[SignedCheckpoint] = []
    expected_n, prev, last_seq = 1, "", 0
    for cp in checkpoints:
        if cp.n != expected_n:
            problems.append(
                AuditProblem(
                    last_seq + 1,
                    f"signed checkpoint {expected_n} is missing (removed); the next one stored is {cp.n}",
                )
            )
        elif cp.prev != prev:
            problems.append(
                AuditProblem(
                    last_seq + 1,
                    f"signed checkpoint {cp.n} does not follow checkpoint {cp.n - 1} "
                    "(a checkpoint was altered or replaced)",
                )
            )
        if public_key is not None and not cp.verifies(public_key):
            problems.append(
                AuditProblem(
                    last_seq + 1,
                    f"signed checkpoint {cp.n} (seq {cp.seq}) does not verify against the public "
                    "key (altered or forged)",
                )
            )
        elif cp.seq < last_seq:
            problems.append(AuditProblem(cp.seq, f"signed checkpoint {cp.n} goes back to seq {cp.seq}"))
        else:
            good.append(cp)
            last_seq = cp.seq
        expected_n, prev = cp.n + 1, cp.digest()
    return good


def audit_log(
    store: EventStore,
    *,
    public_key: str | None,
    anchors: Sequence[SignedCheckpoint] = (),
    from_last_checkpoint: bool = False,
) -> AuditReport:
    """Check the chain, the signed checkpoints and ``anchors`` against ``public_key``.

    Args:
        public_key: the trusted key (hex); ``None`` checks everything but signatures.
        anchors: signed heads kept elsewhere (``tailledger log anchor`` lines).
        from_last_checkpoint: check the chain only from the newest checkpoint that
            verifies (the server's start-up check); the whole log otherwise.
    """
    problems: list[AuditProblem] = []
    stored = store.signed_checkpoints()
    good = _check_checkpoints(stored, public_key, problems)
    by_n = {cp.n: cp for cp in stored}

    targets: dict[int, list[tuple[str, str]]] = {}
    for cp in good:
        targets.setdefault(cp.seq, []).append((cp.hash, f"signed checkpoint {cp.n}"))
    for anchor in anchors:
        if public_key is not None and not anchor.verifies(public_key):
            problems.append(
                AuditProblem(anchor.seq, f"anchor {anchor.n} (seq {anchor.seq}) does not verify against the public key")
            )
            continue
        kept = by_n.get(anchor.n)
        if kept is None or kept.signature != anchor.signature:
            before = max((cp.seq for cp in good if cp.n < anchor.n), default=0)
            what = "is missing (removed)" if kept is None else "differs from the anchor (replaced)"
            problems.append(
                AuditProblem(before + 1, f"signed checkpoint {anchor.n} named by an anchor {what}")
            )
        targets.setdefault(anchor.seq, []).append((anchor.hash, f"anchor {anchor.n}"))

    # Walk the chain, comparing the hash at each signed sequence number.
    start_seq, prev = 0, GENESIS_HASH
    if from_last_checkpoint and good:
        last = good[-1]
        stored_hash = store.hash_at(last.seq)
        if stored_hash is not None and stored_hash == last.hash:
            start_seq, prev = last.seq, last.hash
    head = store.head()
    matched = 0  # the highest signed seq whose hash matched
    count = 0
    expected = start_seq + 1
    broken = False
    for row in store.iter_rows(start_seq):
        if row.seq != expected:
            problems.append(
                AuditProblem(expected, f"missing: expected seq {expected}, found {row.seq} (events removed)")
            )
            broken = True
            break
        if row.prev_hash != prev:
            problems.append(
                AuditProblem(
                    row.seq, "prev_hash does not match the previous event's hash (removed or reordered)"
                )
            )
            broken = True
            break
        if row.computed_hash() != row.hash:
            problems.append(AuditProblem(row.seq, "content does not match its hash (altered)"))
            broken = True
            break
        for want, label in targets.get(row.seq, ()):
            if want != row.hash:
                problems.append(
                    AuditProblem(
                        matched + 1,
                        f"event {row.seq}'s hash differs from {label}: events {matched + 1}..{row.seq} "
                        "were rewritten after they were signed (history re-hashed)",
                    )
                )
                broken = True
            else:
                matched = row.seq
        if broken:
            break
        prev = row.hash
        expected += 1
        count += 1
    if not broken:
        for seq, wanted in sorted(targets.items()):
            if seq > head.seq:
                label = wanted[0][1]
                problems.append(
                    AuditProblem(
                        head.seq + 1,
                        f"the log ends at seq {head.seq} but {label} covers seq {seq} (truncated)",
                    )
                )
                break
    latest = good[-1] if good and good[-1].seq <= head.seq else None
    return AuditReport(
        events=count,
        head_seq=head.seq,
        head_hash=head.hash,
        checkpoints=len(stored),
        anchors=len(anchors),
        signatures_checked=public_key is not None,
        latest=latest,
        problems=tuple(sorted(problems, key=lambda p: p.seq)),
    )
