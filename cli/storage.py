"""Open the configured event store and side tables (SQLite or PostgreSQL).

The one place that turns ``[database]`` into a backend, for the server and for the
commands that read or write the log directly (``log``, ``replay``, ``relay``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from eventlog import EventLogError, EventStore, SQLiteEventStore
from eventlog.sidetables import SideTables

from .config import Config, postgres_conninfo

if TYPE_CHECKING:
    from eventlog.pgstore import LeaderLock

__all__ = ["describe", "open_leader_lock", "open_side_tables", "open_store", "secure_data_dir"]


def open_store(config: Config, *, read_only: bool = False) -> EventStore:
    """The configured event store.

    Raises:
        ConfigError: the password cannot be read.
        EventLogError: the database cannot be opened (a read-only open of a missing
            SQLite file says so).
    """
    if config.database.type == "postgres":
        from eventlog.pgstore import PostgresEventStore

        return PostgresEventStore(
            postgres_conninfo(config.database), connect_timeout=config.durations.database_connect_timeout, read_only=read_only
        )
    path = config.database_path
    if read_only:
        if not path.exists():
            raise EventLogError(f"no event log at {path}")
        return SQLiteEventStore(path, read_only=True)
    return SQLiteEventStore(path, synchronous=config.database.synchronous.upper())


def open_side_tables(config: Config) -> SideTables:
    """The configured side tables (in the same database as the log)."""
    if config.database.type == "postgres":
        from eventlog.pgstore import PostgresSideTables

        return PostgresSideTables(postgres_conninfo(config.database), connect_timeout=config.durations.database_connect_timeout)
    return SideTables(config.database_path)


def open_leader_lock(config: Config) -> LeaderLock | None:
    """The election lock of the replicas (``None`` on SQLite: one server, it leads)."""
    if config.database.type != "postgres":
        return None
    from eventlog.pgstore import LeaderLock

    return LeaderLock(postgres_conninfo(config.database), connect_timeout=config.durations.database_connect_timeout)


def describe(config: Config) -> str:
    """Where the log lives, for messages (never the password)."""
    if config.database.type == "postgres":
        db = config.database  # the validated dsn holds no password
        parts = (("host", db.host), ("port", db.port), ("dbname", db.name), ("user", db.user))
        return "PostgreSQL " + " ".join([db.dsn, *(f"{k}={v}" for k, v in parts if v)]).strip()
    return str(config.database_path)


def secure_data_dir(path: Path) -> None:
    """Create the data directory private to the server's account (0700), its files 0600.

    The log, the checkpoints and the presence table say who may reach what; nobody else
    on the machine has to read them. (A socket in it keeps the mode it was given.)
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for child in path.iterdir():
        if child.is_file() and not child.is_symlink() and child.stat().st_mode & 0o077:
            os.chmod(child, 0o600)
