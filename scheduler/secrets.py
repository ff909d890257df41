"""The key that encrypts inventory secrets at rest, and the box that uses it.

The key is a Fernet key (32 url-safe base64-encoded bytes), read from
``POWERQ_SECRET_KEY`` (:attr:`Config.secret_key`) or else from the file named by
``POWERQ_SECRET_KEY_FILE``, which is created with mode 0600 and a new key when missing.
Several keys may be given, separated by commas or newlines: the first encrypts, every one
decrypts (key rotation). No message ever contains a key or a secret.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from drivers.errors import SettingsError

from .config import Config

__all__ = ["SecretBox", "generate_key", "load_keys"]

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


class SecretBox:
    """Encrypts and decrypts single secret strings with the configured key(s)."""

    def __init__(self, keys: str | bytes | list[str]) -> None:
        """Raises :class:`SettingsError` when a key is malformed."""
        if isinstance(keys, bytes):
            keys = keys.decode("ascii", errors="replace")
        listed = _split_keys(keys) if isinstance(keys, str) else list(keys)
        _check_keys(listed, "the secret key")
        self._fernet = MultiFernet([Fernet(k.encode("ascii")) for k in listed])

    @classmethod
    def from_config(cls, config: Config) -> SecretBox:
        """A box with the keys of :func:`load_keys`. Raises :class:`SettingsError`."""
        return cls(load_keys(config))

    def encrypt(self, value: str) -> str:
        """The token for ``value`` (url-safe ASCII). Raises ``TypeError`` for a non-string."""
        if not isinstance(value, str):
            raise TypeError("only strings can be encrypted")
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The clear value of ``token``.

        Raises :class:`SettingsError` ("secret cannot be decrypted with the configured
        key") for a token made with another key, or damaged.
        """
        try:
            data = token.encode("ascii") if isinstance(token, str) else token
            return self._fernet.decrypt(data).decode("utf-8")
        except (InvalidToken, ValueError, TypeError, AttributeError):
            raise SettingsError("secret cannot be decrypted with the configured key") from None

    def __repr__(self) -> str:
        return "SecretBox(<keys hidden>)"
