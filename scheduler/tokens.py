"""API tokens: named, scoped, stored hashed in Redis, shown in clear exactly once.

A token reads ``pqt.<name>.<random>``: the name is public (it is what a job's
``requested_by`` and the API audit trail show, as ``api:<name>``), the random part is 256
bits from :func:`secrets.token_urlsafe`. Redis keeps, per name, a random salt and
``sha256(salt || token)``; a presented token is hashed the same way and compared with
:func:`hmac.compare_digest`. A token is never stored, logged or returned in clear after
``powerq token add`` printed it.

Redis layout (``P`` is :attr:`Config.key_prefix`):

- ``P:api:tokens`` hash: name -> JSON ``{"salt", "hash", "scope", "created"}``
- ``P:api:tokens:used`` hash: name -> epoch seconds of its last successful use

Scopes are ordered: ``read`` (GET endpoints) < ``operate`` (also power actions and the
MAAS webhook) < ``admin`` (also loading the inventory).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drivers.errors import SettingsError

SCOPES = ("read", "operate", "admin")
"""From least to most: each scope allows what the ones before it allow."""

TOKEN_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_PREFIX = "pqt"
_DUMMY_SALT = bytes(16)


class TokenError(SettingsError):
    """A token cannot be created or revoked as asked (bad name, bad scope, name taken)."""

    code = "bad_token"
    default_message = "bad token request"


@dataclass(frozen=True)
class TokenInfo:
    """What is known of a token without its value: safe to print and return."""

    name: str
    scope: str
    created: float
    last_used: float | None = None

    @property
    def requested_by(self) -> str:
        """How jobs and the audit trail name whoever used this token."""
        return f"api:{self.name}"

    def allows(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


def _digest(salt: bytes, token: str) -> str:
    return hashlib.sha256(salt + token.encode("utf-8")).hexdigest()


def token_name(token: str) -> str | None:
    """The name inside a token of the ``pqt.<name>.<random>`` form, or None."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _PREFIX or not TOKEN_NAME_RE.match(parts[1]):
        return None
    return parts[1]


class TokenStore:
    """The API tokens of one powerq installation (``client``: a ``redis.Redis``)."""

    def __init__(self, client: Any, prefix: str, *, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self._clock = clock
        self.key = f"{prefix}:api:tokens"
        self.used_key = f"{prefix}:api:tokens:used"

    def add(self, name: str, scope: str = "operate") -> str:
        """Create token ``name`` and return its value: the only time it exists in clear.

        Raises :class:`TokenError` for a bad name or scope, or a name already taken;
        ``redis.RedisError`` when Redis fails.
        """
        if not isinstance(name, str) or not TOKEN_NAME_RE.match(name):
            raise TokenError("a token name is 1 to 64 letters, digits, '_' or '-'")
        if scope not in SCOPES:
            raise TokenError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
        token = f"{_PREFIX}.{name}.{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        record = {
            "salt": salt.hex(),
            "hash": _digest(salt, token),
            "scope": scope,
            "created": self._clock(),
        }
        if not self._redis.hsetnx(self.key, name, json.dumps(record)):
            raise TokenError(f"a token named {name!r} exists: revoke it first")
        return token

    def revoke(self, name: str) -> bool:
        """Delete token ``name``; False if there was none. Raises ``redis.RedisError``."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(self.key, name)
        pipe.hdel(self.used_key, name)
        return bool(pipe.execute()[0])

    def list(self) -> list[TokenInfo]:
        """Every token's name, scope and times, by name. Raises ``redis.RedisError``."""
        used = {_text(k): _text(v) for k, v in self._redis.hgetall(self.used_key).items()}
        out = []
        for raw_name, raw in self._redis.hgetall(self.key).items():
            name = _text(raw_name)
            info = self._info(name, raw, used.get(name))
            if info is not None:
                out.append(info)
        return sorted(out, key=lambda i: i.name)

    def verify(self, token: str, name: str | None = None) -> TokenInfo | None:
        """The token's info if ``token`` is valid (and, when ``name`` is given, is that
        token's); else None. Takes about the same time for an unknown name as for a wrong
        token. Records the time of use. Raises ``redis.RedisError``."""
        inside = token_name(token) if isinstance(token, str) else None
        if name is not None and inside != name:
            inside = None
        raw = self._redis.hget(self.key, inside) if inside else None
        data = _parse(raw)
        if data is None:
            hmac.compare_digest(_digest(_DUMMY_SALT, str(token)), "0" * 64)
            return None
        try:
            salt = bytes.fromhex(str(data.get("salt", "")))
        except ValueError:
            return None
        if not hmac.compare_digest(_digest(salt, token), str(data.get("hash", ""))):
            return None
        now = self._clock()
        info = self._info(str(inside), raw, now)
        if info is not None:
            self._redis.hset(self.used_key, info.name, repr(now))
        return info

    @staticmethod
    def _info(name: str, raw: Any, last_used: Any = None) -> TokenInfo | None:
        data = _parse(raw)
        if data is None or data.get("scope") not in SCOPES:
            return None
        try:
            last = float(last_used) if last_used else None
        except ValueError:
            last = None
        return TokenInfo(name, str(data["scope"]), float(data.get("created") or 0.0), last)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _parse(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        data = json.loads(_text(raw))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
