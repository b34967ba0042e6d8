"""The server's version, from the package metadata (``tailledger --version``, ``/version``)."""

from __future__ import annotations

__all__ = ["package_version"]


def package_version() -> str:
    """The installed package's version (its metadata), else the source tree's
    ``pyproject.toml`` (running from a checkout), else ``"unknown"``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tailledger")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"
