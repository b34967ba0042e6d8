"""``database.type = "postgres"``: a DSN or its parts, the password from a file or the
environment, never in the configuration itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from cli.config import Config, ConfigError, load_config, postgres_conninfo, redacted


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    f = tmp_path / "c.toml"
    f.write_text("[database]\ntype = 'postgres'\n" + text)
    return load_config(f, env or {})


def test_parts_and_a_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    config = _load(tmp_path, f"host = 'db.internal'\nport = 5433\nname = 'ledger'\nuser = 'tl'\npassword_file = '{secret}'\n")
    assert conninfo_to_dict(postgres_conninfo(config.database)) == {
        "host": "db.internal", "port": "5433", "dbname": "ledger", "user": "tl", "password": "s3cret",
    }
    assert "s3cret" not in str(redacted(config))


def test_a_dsn_with_the_password_from_the_environment(tmp_path: Path) -> None:
    config = _load(tmp_path, "dsn = 'postgresql://tl@db/ledger'\npassword_env = 'LEDGER_PW'\n")
    parts = conninfo_to_dict(postgres_conninfo(config.database, {"LEDGER_PW": "pw"}))
    assert parts["password"] == "pw" and parts["dbname"] == "ledger" and parts["host"] == "db"
    with pytest.raises(ConfigError, match="LEDGER_PW is not set"):
        postgres_conninfo(config.database, {})


def test_the_environment_selects_postgres(tmp_path: Path) -> None:
    config = load_config(None, {"TAILLEDGER_DATABASE__TYPE": "postgres", "TAILLEDGER_DATABASE__DSN": "host=/run/pg dbname=x"})
    assert config.database.type == "postgres"
    assert conninfo_to_dict(postgres_conninfo(config.database, {})) == {"host": "/run/pg", "dbname": "x"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "needs a dsn, or a host and a name"),
        ("dsn = 'host=db password=x dbname=l'", "holds a password"),
        ("dsn = 'postgresql://u:pw@db/l'", "holds a password"),
        ("dsn = 'host=db = ='", "not a connection string"),
        ("host = 'db'\npassword_file = 'a'\npassword_env = 'B'", "not both"),
        ("host = 'db'\nport = 70000", "database.port"),
        ("host = 'db'\nconnect_timeout = '0'", "database.connect_timeout"),
    ],
)
def test_bad_postgres_config_is_explained(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_an_unreadable_password_file_is_named(tmp_path: Path) -> None:
    config = _load(tmp_path, f"host = 'db'\npassword_file = '{tmp_path / 'missing'}'\n")
    with pytest.raises(ConfigError, match="password_file: cannot read it"):
        postgres_conninfo(config.database)


def test_other_database_types_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[database]\ntype = 'mysql'\n")
    with pytest.raises(ConfigError, match="is not 'sqlite' or 'postgres'"):
        load_config(f, {})
