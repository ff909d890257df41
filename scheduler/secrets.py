"""The key that encrypts inventory secrets at rest, and the box that uses it.

The key is a Fernet key (32 url-safe base64-encoded bytes), read from
``POWERQ_SECRET_KEY`` (:attr:`Config.secret_key`) or else from the file named by
``POWERQ_SECRET_KEY_FILE``, which is created with mode 0600 and a new key when missing.
Several keys may be given, separated by commas or newlines: the first (the primary)
encrypts, every one decrypts. No message ever contains a key or a secret.

Key rotation (``powerq keys rotate`` / ``powerq keys prune``, issue 5):

- :func:`rotate` makes a new primary key (written first in the key file, the old keys
  kept after it for decryption; with ``POWERQ_SECRET_KEY`` the operator puts the new key
  first there) and re-encrypts every sealed value in Redis under it with
  ``MultiFernet.rotate``, one WATCH/MULTI transaction per hash (:data:`SEALED_HASHES`), so
  an inventory load running at the same time is never overwritten with older values.
- :func:`prune` drops the old keys, but only once no stored value needs one of them.
- A :class:`SecretBox` built from a key file notices when the file changes (a ``stat``
  before each encryption and after a failed decryption) and reads it again: a
  long-running worker or API process picks a rotated key up by itself, with no restart.
  Keys from ``POWERQ_SECRET_KEY`` are read once per process: restart it to change them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from drivers.errors import SettingsError

from .config import Config

__all__ = [
    "SEALED_HASHES", "SecretBox", "fingerprint", "generate_key", "key_status", "load_keys",
    "prune", "reseal", "rotate",
]

_KEY_HELP = (
    "a Fernet key is 32 url-safe base64-encoded bytes, as made by "
    "cryptography.fernet.Fernet.generate_key()"
)


def generate_key() -> str:
    """A new random Fernet key."""
    return Fernet.generate_key().decode("ascii")


def _split_keys(text: str) -> list[str]:
    return [k.strip() for k in text.replace(",", "\n").splitlines() if k.strip()]


def _check_keys(keys: list[str], source: str) -> list[str]:
    if not keys:
        raise SettingsError(f"{source} holds no key")
    for index, key in enumerate(keys, 1):
        try:
            Fernet(key.encode("ascii"))
        except (ValueError, TypeError, UnicodeEncodeError):
            which = f"key {index} of {source}" if len(keys) > 1 else source
            raise SettingsError(f"{which} is not a valid key: {_KEY_HELP}") from None
    return keys


def _read_key_file(path: Path) -> list[str]:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IXOTH):
            raise SettingsError(
                f"key file {path} is accessible to every user (mode {stat.S_IMODE(mode):04o}): "
                f"run `chmod 600 {path}`"
            )
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise SettingsError(f"key file {path} is not a valid key: {_KEY_HELP}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read key file {path}: {exc.strerror}") from None
    return _check_keys(_split_keys(text), f"key file {path}")


def _create_key_file(path: Path) -> list[str] | None:
    """Write a new key to ``path`` (mode 0600); None if someone else created it first."""
    key = generate_key()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    except OSError as exc:
        raise SettingsError(f"cannot create key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key + "\n")
    return [key]


def load_keys(config: Config) -> list[str]:
    """The configured Fernet keys, the encrypting one first.

    From ``config.secret_key`` when set, else from ``config.secret_key_file`` (``~``
    expanded), which is created with mode 0600 and a new key when missing.

    Raises :class:`SettingsError` when a key is malformed, when the key file cannot be
    read or created, or when it is readable or writable by every user.
    """
    if config.secret_key:
        return _check_keys(_split_keys(config.secret_key), "POWERQ_SECRET_KEY")
    if not config.secret_key_file:
        raise SettingsError("no key configured: set POWERQ_SECRET_KEY or POWERQ_SECRET_KEY_FILE")
    path = Path(config.secret_key_file).expanduser()
    if not path.exists():
        created = _create_key_file(path)
        if created is not None:
            return created
    return _read_key_file(path)


def fingerprint(key: str) -> str:
    """A short public name of a key (the start of its SHA-256): safe to print and log."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()[:12]


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class SecretBox:
    """Encrypts and decrypts single secret strings with the configured key(s).

    Built with ``key_file``, the box reads the file again when it changed (checked before
    each encryption and after a decryption fails), so a rotated key reaches a running
    process without a restart.
    """

    def __init__(self, keys: str | bytes | list[str], *, key_file: Path | None = None) -> None:
        """Raises :class:`SettingsError` when a key is malformed."""
        if isinstance(keys, bytes):
            keys = keys.decode("ascii", errors="replace")
        listed = _split_keys(keys) if isinstance(keys, str) else list(keys)
        self._lock = threading.Lock()
        self._key_file = key_file
        self._signature = _file_signature(key_file) if key_file is not None else None
        self._set_keys(_check_keys(listed, "the secret key"))

    def _set_keys(self, keys: list[str]) -> None:
        self._keys = list(keys)
        self._fernets = [Fernet(k.encode("ascii")) for k in keys]
        self._fernet = MultiFernet(self._fernets)

    @classmethod
    def from_config(cls, config: Config) -> SecretBox:
        """A box with the keys of :func:`load_keys`. Raises :class:`SettingsError`."""
        keys = load_keys(config)
        if config.secret_key:
            return cls(keys)
        return cls(keys, key_file=Path(config.secret_key_file).expanduser())

    def refresh(self) -> bool:
        """Read the key file again if it changed since it was read; True if the keys
        changed. A key file that cannot be read now keeps the keys already held."""
        if self._key_file is None:
            return False
        with self._lock:
            signature = _file_signature(self._key_file)
            if signature is None or signature == self._signature:
                return False
            try:
                keys = _read_key_file(self._key_file)
            except SettingsError:
                return False
            self._signature = signature
            if keys == self._keys:
                return False
            self._set_keys(keys)
            return True

    @property
    def fingerprints(self) -> list[str]:
        """The public names of the keys held, the primary first."""
        return [fingerprint(k) for k in self._keys]

    def encrypt(self, value: str) -> str:
        """The token for ``value`` (url-safe ASCII). Raises ``TypeError`` for a non-string."""
        if not isinstance(value, str):
            raise TypeError("only strings can be encrypted")
        self.refresh()
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The clear value of ``token``.

        Raises :class:`SettingsError` ("secret cannot be decrypted with the configured
        key") for a token made with another key, or damaged.
        """
        for attempt in (1, 2):
            try:
                data = token.encode("ascii") if isinstance(token, str) else token
                return self._fernet.decrypt(data).decode("utf-8")
            except (InvalidToken, ValueError, TypeError, AttributeError):
                if attempt == 2 or not self.refresh():
                    break
        raise SettingsError("secret cannot be decrypted with the configured key")

    def rotate_token(self, token: str) -> str:
        """``token`` encrypted again under the primary key. Raises :class:`SettingsError`
        when no key held decrypts it."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, ValueError, TypeError, AttributeError):
            raise SettingsError("secret cannot be decrypted with the configured key") from None

    def key_index(self, token: str) -> int | None:
        """The position (0: primary) of the key that decrypts ``token``; None if none does."""
        for index, fernet in enumerate(self._fernets):
            try:
                fernet.decrypt(token.encode("ascii"))
                return index
            except (InvalidToken, ValueError, TypeError, AttributeError):
                continue
        return None

    def __repr__(self) -> str:
        return f"SecretBox(<{len(self._keys)} key(s) hidden>)"


# -- key rotation (issue 5) ---------------------------------------------------------------------
SEALED_MARK = "$enc"
"""A sealed value in stored JSON is ``{"$enc": "<fernet token>", ...}`` (scheduler/inventory.py)."""

SEALED_HASHES = ("inventory", "inventory:enlisted")
"""The Redis hashes (``<prefix>:<name>``) whose values hold sealed secrets: the inventory
and the credentials ``powerq enlist`` created. API tokens (``<prefix>:api:tokens``) are
salted hashes, not sealed values: nothing there to re-encrypt."""

_LOCK_SECONDS = 600


def _walk(value: Any, visit: Callable[[str], str | None]) -> Any:
    """``value`` with every sealed token replaced by ``visit(token)`` (None: unchanged)."""
    if isinstance(value, dict):
        if isinstance(value.get(SEALED_MARK), str):
            new = visit(value[SEALED_MARK])
            return value if new is None else {**value, SEALED_MARK: new}
        return {k: _walk(v, visit) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, visit) for v in value]
    return value


def _tokens_of(raw: Any) -> list[str]:
    found: list[str] = []

    def visit(token: str) -> None:
        found.append(token)

    try:
        _walk(json.loads(raw), visit)
    except ValueError:
        pass
    return found


def write_key_file(path: Path, keys: list[str]) -> None:
    """Replace ``path`` with ``keys`` (the primary first), mode 0600, atomically: a
    reader sees the old file or the new one, never half of one. Raises :class:`SettingsError`."""
    _check_keys(keys, "the new key list")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write("\n".join(keys) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise SettingsError(f"cannot write key file {path}: {exc.strerror}") from None


def reseal(client: Any, prefix: str, box: SecretBox, *, retries: int = 50) -> dict[str, Any]:
    """Encrypt every sealed value of :data:`SEALED_HASHES` again under ``box``'s primary
    key: per hash, WATCH, read, rotate, MULTI/EXEC; a hash changed meanwhile (an inventory
    load) is read and rotated again. Values no key decrypts are left as they are and
    counted in ``unreadable`` (as ``"<hash>/<field>"``, never a value).

    Raises :class:`SettingsError` when a hash keeps changing for ``retries`` attempts;
    ``redis.RedisError`` when Redis fails.
    """
    import redis

    report: dict[str, Any] = {"values": 0, "unreadable": []}
    for name in SEALED_HASHES:
        key = f"{prefix}:{name}"
        with client.pipeline(transaction=True) as pipe:
            for _ in range(retries):
                try:
                    pipe.watch(key)
                    entries = pipe.hgetall(key)
                    updates: dict[str, str] = {}
                    unreadable: list[str] = []
                    count = 0
                    for field, raw in entries.items():
                        field_name = field.decode() if isinstance(field, bytes) else str(field)
                        bad = False

                        def visit(token: str) -> str | None:
                            nonlocal count, bad
                            try:
                                new = box.rotate_token(token)
                            except SettingsError:
                                bad = True
                                return None
                            count += 1
                            return new

                        try:
                            data = json.loads(raw)
                        except ValueError:
                            continue
                        new_data = _walk(data, visit)
                        if bad:
                            unreadable.append(f"{name}/{field_name}")
                        if new_data != data:
                            updates[field_name] = json.dumps(new_data, sort_keys=True)
                    pipe.multi()
                    if updates:
                        pipe.hset(key, mapping=updates)
                    pipe.execute()
                    report["values"] += count
                    report["unreadable"].extend(unreadable)
                    break
                except redis.WatchError:
                    continue
            else:
                raise SettingsError(f"{key} kept changing while it was re-encrypted: try again")
    return report


def usage(client: Any, prefix: str, box: SecretBox) -> dict[str, Any]:
    """How many stored sealed values each key of ``box`` opens (``by_key``, the primary
    first) and how many none does (``unreadable``). Decrypts, prints nothing."""
    by_key = [0] * len(box.fingerprints)
    unreadable = 0
    for name in SEALED_HASHES:
        for raw in client.hgetall(f"{prefix}:{name}").values():
            for token in _tokens_of(raw):
                index = box.key_index(token)
                if index is None:
                    unreadable += 1
                else:
                    by_key[index] += 1
    return {"by_key": by_key, "unreadable": unreadable}


class _Lock:
    """One rotation at a time per prefix (a Redis key with an expiry)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.key, self.token = client, f"{prefix}:keys:lock", uuid.uuid4().hex

    def __enter__(self) -> _Lock:
        if not self.client.set(self.key, self.token, nx=True, ex=_LOCK_SECONDS):
            raise SettingsError("another key rotation is running (lock "
                                f"{self.key}); wait for it, or delete the key if it died")
        return self

    def __exit__(self, *_: Any) -> None:
        current = self.client.get(self.key)
        if current is not None and (current.decode() if isinstance(current, bytes) else current) == self.token:
            self.client.delete(self.key)


def _source(config: Config) -> tuple[str, Path | None]:
    if config.secret_key:
        return "POWERQ_SECRET_KEY", None
    path = Path(config.secret_key_file).expanduser()
    return f"key file {path}", path


def key_status(config: Config, client: Any | None = None, prefix: str = "powerq") -> dict[str, Any]:
    """Where the keys come from, how many, the primary's fingerprint and, with a
    ``client``, how many stored values each key opens. Never a key.
    Raises :class:`SettingsError` as :func:`load_keys`."""
    keys = load_keys(config)
    source, _ = _source(config)
    out: dict[str, Any] = {"source": source, "keys": len(keys), "primary": fingerprint(keys[0]),
                           "fingerprints": [fingerprint(k) for k in keys]}
    if client is not None:
        out["sealed"] = usage(client, prefix, SecretBox(keys))
    return out


def rotate(config: Config, client: Any, prefix: str) -> dict[str, Any]:
    """Make a new primary key and re-encrypt every stored secret under it.

    With a key file: a new key is generated and written first in the file (the old keys
    after it, still decrypting), then :func:`reseal` runs. With ``POWERQ_SECRET_KEY`` no
    key is generated (the variable cannot be written from here): the operator has put
    the new key first in it, on every host, and this re-encrypts under that key.

    Raises :class:`SettingsError` (bad keys, key file not writable, another rotation
    running); ``redis.RedisError``.
    """
    old = load_keys(config)
    source, path = _source(config)
    with _Lock(client, prefix):
        if path is not None:
            keys = [generate_key()] + [k for k in old]
            write_key_file(path, keys)
        else:
            keys = old
        box = SecretBox(keys)
        report = reseal(client, prefix, box)
    return {"source": source, "generated": path is not None, "keys": len(keys),
            "primary": fingerprint(keys[0]), **report}


def prune(config: Config, client: Any, prefix: str) -> dict[str, Any]:
    """Drop every key but the primary once no stored value needs another one.

    Re-encrypts first (values written meanwhile with an old key by a process that had not
    yet seen the new one), then checks every sealed value opens with the primary alone;
    only then is the key file rewritten with the primary key only. With
    ``POWERQ_SECRET_KEY`` the check runs and the report says which keys may be removed
    from the variable.

    Raises :class:`SettingsError` when a value still needs an old key (nothing dropped).
    """
    keys = load_keys(config)
    source, path = _source(config)
    with _Lock(client, prefix):
        box = SecretBox(keys)
        report = reseal(client, prefix, box)
        used = usage(client, prefix, box)
        needing_old = sum(used["by_key"][1:])
        if needing_old:
            raise SettingsError(f"{needing_old} stored value(s) still need an old key: "
                                "run `powerq keys rotate` again, then prune")
        dropped = [fingerprint(k) for k in keys[1:]]
        if path is not None and dropped:
            write_key_file(path, keys[:1])
    return {"source": source, "keys": 1 if path is not None else len(keys),
            "primary": fingerprint(keys[0]), "dropped": dropped if path is not None else [],
            "removable": dropped if path is None else [], "values": report["values"],
            "unreadable": report["unreadable"]}
