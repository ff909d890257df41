"""Log lines for `powerq worker`, `powerq api` and `powerq poll`: text or JSON, never a secret.

``log_format`` (``POWERQ_LOG_FORMAT``) picks the format:

- ``text``: ``2025-01-02 03:04:05,678 INFO powerq.worker message [job_id=... node=...]``
- ``json``: one object per line with ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``,
  and ``job_id``, ``node``, ``rack``, ``power_type``, ``action`` when known, plus ``exc``
  for a traceback.

What a line knows comes from :func:`log_context`, a context variable the worker sets
around a chunk (job, action) and around each node (node, rack, power type); it follows
the node into the threads that run its driver calls (see ``workers/tasks.py``).

:class:`RedactFilter` (on the handler, so it sees every record, including Celery's and
the libraries') masks the value of any known secret field (``power_pass=...``,
``"password": "..."``), anything that looks like an API token (``pqt.…``) and a password
in a URL. The formatters mask tracebacks the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
CONTEXT_FIELDS = ("job_id", "node", "rack", "power_type", "action")

_context: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "powerq_log_context", default=None
)

# Secret parameter names that exist whatever drivers are installed; the registered
# drivers' own secret fields are added on first use (see :func:`secret_field_names`).
STATIC_SECRET_FIELDS = frozenset({
    "power_pass", "password", "passwd", "secret", "secret_key", "token", "api_key",
    "apikey", "community", "auth_key", "priv_key", "privacy_key", "authentication_key",
    "flower_basic_auth", "basic_auth", "authorization", "private_key",
})
MASK = "***"


# --------------------------------------------------------------------------- context
def current_context() -> Mapping[str, str]:
    """The fields (job_id, node, rack, power_type, action) known to the current code."""
    return _context.get() or {}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (None values are left out) to every log line inside the block."""
    merged = {**current_context(), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


# --------------------------------------------------------------------------- redaction
_secret_names: frozenset[str] | None = None


def secret_field_names() -> frozenset[str]:
    """Static names plus every registered driver's secret settings fields."""
    global _secret_names
    if _secret_names is None:
        names = set(STATIC_SECRET_FIELDS)
        try:
            from drivers import registry

            for driver in registry.all_drivers().values():
                names |= set(driver.settings_model.secret_fields())
        except Exception:  # a broken driver module must not stop logging
            pass
        _secret_names = frozenset(names)
    return _secret_names


_TOKEN_RE = re.compile(r"\bpqt\.[^\s\"'<>,;)\]}]+")
_URL_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s\"']*:)[^@\s\"']+@")
_field_res: tuple[re.Pattern[str], re.Pattern[str]] | None = None


def _field_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(quoted value, bare value) after a secret field's name and ``=`` or ``:``."""
    global _field_res
    if _field_res is None:
        names = "|".join(sorted((re.escape(n) for n in secret_field_names()), key=len, reverse=True))
        head = rf"""((["']?)\b(?:{names})\b\2\s*[:=]\s*)"""
        _field_res = (
            re.compile(rf"""(?i){head}(["'])(?:\\.|(?!\3).)*\3"""),
            re.compile(rf"""(?i){head}(?!["'])[^\s,;&)}}\]]+"""),
        )
    return _field_res


def redact(text: str) -> str:
    """``text`` with secret field values, token-like strings and URL passwords masked."""
    if not text:
        return text
    quoted, bare = _field_patterns()
    text = quoted.sub(lambda m: f"{m.group(1)}{m.group(3)}{MASK}{m.group(3)}", text)
    text = bare.sub(lambda m: f"{m.group(1)}{MASK}", text)
    text = _TOKEN_RE.sub("pqt." + MASK, text)
    return _URL_RE.sub(rf"\g<1>{MASK}@", text)


class RedactFilter(logging.Filter):
    """Masks secrets in a record's message (formatted with its arguments). Attach it to
    a handler so that it sees records from every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw text, masked
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


# --------------------------------------------------------------------------- formatters
def _fields(record: logging.LogRecord) -> dict[str, str]:
    out = dict(current_context())
    for name in CONTEXT_FIELDS:  # ``extra={"node": ...}`` wins over the context
        value = record.__dict__.get(name)
        if value is not None:
            out[name] = str(value)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the context fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message [job_id=... node=...]``, tracebacks masked."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            head, sep, rest = line.partition("\n")
            line = head + " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]" + sep + rest
        return redact(line)


def formatter_for(fmt: str) -> logging.Formatter:
    """The formatter of ``fmt`` (``text`` or ``json``). Raises ValueError for another."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def setup_logging(fmt: str = "text", level: str | int = "INFO",
                  stream: TextIO | None = None) -> logging.Handler:
    """Send every log record (root logger) to ``stream`` (stderr) in ``fmt``, through
    :class:`RedactFilter`, Python warnings included. Calling it again replaces the handler
    it added before; other handlers are left alone. Raises ValueError for an unknown format or level."""
    formatter = formatter_for(fmt)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_powerq", False):
            root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._powerq = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter)
    handler.addFilter(RedactFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # Python warnings become log lines (py.warnings) too
    return handler


__all__ = [
    "FORMATS", "JsonFormatter", "RedactFilter", "TextFormatter", "current_context",
    "formatter_for", "log_context", "redact", "secret_field_names", "setup_logging",
]
