"""The one error taxonomy every driver raises.

Every protocol library's exceptions are translated into these at the driver's edge
(``raise UnreachableError(...) from exc``). Code above the drivers never sees a
library exception, and never branches on message text: it reads ``code`` and ``kind``.

::

    PowerError                      (never raised itself)
     ├── FatalError                 never retried
     │    ├── SettingsError         bad_settings         parameters invalid or incomplete
     │    │    └── UnknownPowerTypeError  unknown_power_type
     │    ├── AuthError             auth_failed          the device refused the credentials
     │    ├── UnsupportedError      unsupported          the device or driver cannot do this
     │    ├── ToolMissingError      tool_missing         a protocol library is not installed
     │    ├── NotFoundError         not_found            the node is not behind that device
     │    └── DeviceError           device_error         the device answered with an error
     ├── TransientError             retried with backoff
     │    ├── UnreachableError      unreachable          no route / connection refused / no answer
     │    ├── CallTimeoutError      timeout              the call did not finish in time
     │    └── BusyError             busy                 BMC busy, no free session
     └── StateMismatchError         state_mismatch       the action returned but the state disagrees

Error results stored or sent anywhere are plain data (:meth:`PowerError.to_dict`), never
pickled exceptions. Messages must never contain a secret: drivers build them from
addresses and codes, not from library exception text that might echo a password.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ErrorKind(StrEnum):
    FATAL = "fatal"
    TRANSIENT = "transient"
    MISMATCH = "mismatch"


class PowerError(Exception):
    """Base of the taxonomy. Subclasses only set ``code``, ``kind`` and a default message."""

    code: ClassVar[str] = "error"
    kind: ClassVar[ErrorKind] = ErrorKind.FATAL
    default_message: ClassVar[str] = "power operation failed"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)

    @property
    def retryable(self) -> bool:
        return self.kind is ErrorKind.TRANSIENT

    def to_dict(self) -> dict[str, Any]:
        """Plain data for results and events."""
        data: dict[str, Any] = {"code": self.code, "kind": str(self.kind), "message": self.message}
        if self.details:
            data["details"] = self.details
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class FatalError(PowerError):
    kind = ErrorKind.FATAL


class TransientError(PowerError):
    kind = ErrorKind.TRANSIENT
    code = "transient"


class SettingsError(FatalError):
    code = "bad_settings"
    default_message = "invalid power parameters"


class UnknownPowerTypeError(SettingsError):
    code = "unknown_power_type"
    default_message = "unknown power type"


class AuthError(FatalError):
    code = "auth_failed"
    default_message = "the device refused the credentials"


class UnsupportedError(FatalError):
    code = "unsupported"
    default_message = "operation not supported by this power type"


class ToolMissingError(FatalError):
    code = "tool_missing"
    default_message = "a library this power type needs is not installed"


class NotFoundError(FatalError):
    code = "not_found"
    default_message = "the node was not found behind its power device"


class DeviceError(FatalError):
    code = "device_error"
    default_message = "the device answered with an error"


class UnreachableError(TransientError):
    code = "unreachable"
    default_message = "the device did not answer"


class CallTimeoutError(TransientError):
    code = "timeout"
    default_message = "the call did not finish in time"


class BusyError(TransientError):
    code = "busy"
    default_message = "the device is busy or has no free session"


class StateMismatchError(PowerError):
    kind = ErrorKind.MISMATCH
    code = "state_mismatch"
    default_message = "the action returned but the power state did not follow"


ALL_ERRORS: tuple[type[PowerError], ...] = (
    SettingsError,
    UnknownPowerTypeError,
    AuthError,
    UnsupportedError,
    ToolMissingError,
    NotFoundError,
    DeviceError,
    UnreachableError,
    CallTimeoutError,
    BusyError,
    StateMismatchError,
)

ERROR_CODES: dict[str, type[PowerError]] = {cls.code: cls for cls in ALL_ERRORS}
