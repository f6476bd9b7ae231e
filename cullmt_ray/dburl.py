"""Where a results store lives: a SQLite file (the embedded default) or a PostgreSQL database.

``output.store`` / ``--store`` takes a file path (``results/store.sqlite``, or ``sqlite:///PATH``) or
``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE`` (``postgres://`` too, libpq's URL syntax).
A password is never written out: :func:`mask` turns it into ``***`` in config.yaml, run.json and logs,
and a URL whose password is ``***`` connects without one, so libpq takes it from ``PGPASSWORD`` or
``~/.pgpass`` (how a resumed run, whose config.yaml holds no password, reconnects).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

MASK = "***"
PG_SCHEMES = ("postgresql", "postgres")
EXPECTED = ("expected a SQLite file such as results/store.sqlite or a PostgreSQL URL "
            "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
_USERINFO = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^@/\s]*@")
_QUERY = re.compile(r"(?P<pre>[?&]password=)[^&\s]*")


class StoreError(ValueError):
    """A results store that cannot be used; one line naming it (password masked)."""


def mask(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***``."""
    return _QUERY.sub(rf"\g<pre>{MASK}", _USERINFO.sub(rf"\g<pre>:{MASK}@", text))


def mask_secrets(obj):
    """A copy of a config mapping (nested dicts, lists, strings) with every URL password masked."""
    if isinstance(obj, dict):
        return {k: mask_secrets(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask_secrets(v) for v in obj]
    return mask(obj) if isinstance(obj, str) else obj


@dataclass(frozen=True)
class StoreLocation:
    """A parsed ``output.store``: ``kind`` sqlite (``path``) or postgresql (``url``)."""

    kind: str
    path: Path | None = None
    url: str = ""

    @property
    def shown(self) -> str:
        """How the store is named in messages and files (no password)."""
        return mask(self.url) if self.url else str(self.path)

    @property
    def conninfo(self) -> str:
        """The URL for libpq: a masked password is left out (PGPASSWORD or ~/.pgpass provides it)."""
        url = self.url.replace(f":{MASK}@", "@", 1)
        url = re.sub(rf"([?&])password={re.escape(MASK)}(&|$)", lambda m: m.group(1) if m.group(2) else "", url)
        return url.rstrip("?&")

    @property
    def sqlalchemy_url(self) -> str:
        """The same database for SQLAlchemy (Optuna's RDB storage), through psycopg 3."""
        return "postgresql+psycopg://" + self.conninfo.split("://", 1)[1]


def parse_store(value: str | Path) -> StoreLocation:
    """``value`` as a store location; an unknown URL scheme is a one-line :class:`StoreError`."""
    text = str(value).strip()
    if "://" not in text:
        if not text:
            raise StoreError(f"results store {text!r} is empty; {EXPECTED}")
        return StoreLocation("sqlite", Path(text))
    scheme = text.split("://", 1)[0].lower()
    if scheme == "sqlite":
        path = text.split("://", 1)[1]
        if not path.startswith("/") or len(path) < 2:
            raise StoreError(f"results store {mask(text)!r}: expected sqlite:///relative/path or sqlite:////absolute/path")
        return StoreLocation("sqlite", Path(path[1:]))
    if scheme in PG_SCHEMES:
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as e:
            raise StoreError(f"results store {mask(text)!r}: not a valid URL ({e}); {EXPECTED}") from None
        if not parts.hostname and "host=" not in parts.query:
            raise StoreError(f"results store {mask(text)!r}: no host; {EXPECTED}")
        return StoreLocation("postgresql", url=text)
    raise StoreError(f"results store {mask(text)!r}: unknown database scheme {scheme!r}; {EXPECTED}")
