"""Log lines: JSON or text, with the job / node context, never a secret."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest
from celery import signals

from drivers.errors import SettingsError
from scheduler.config import Config
from scheduler.logs import (
    JsonFormatter,
    RedactFilter,
    TextFormatter,
    current_context,
    log_context,
    redact,
    secret_field_names,
    setup_logging,
)

SECRET = "Hunter2-Secret"


@pytest.fixture()
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactFilter())
    logger = logging.getLogger("powerq.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("text", [
    f"power_pass={SECRET} next",
    f'{{"power_pass": "{SECRET}", "power_user": "admin"}}',
    f"Settings(power_pass='{SECRET}', power_address='10.0.0.1')",
    f"password: {SECRET}; retrying",
    f"community={SECRET}&oid=1.3",
    f"token pqt.ops.{SECRET} was refused",
    f"redis://user:{SECRET}@10.0.0.5:6379/0",
    f"Authorization: Bearer pqt.ops.{SECRET}",
])
def test_redact_masks_secrets(text: str) -> None:
    out = redact(text)
    assert SECRET not in out and "***" in out


def test_redact_keeps_ordinary_text() -> None:
    text = "power_user=admin power_address=10.0.0.1 job 20250101-000000-abc123 pqt-1234"
    assert redact(text) == text


def test_every_registered_drivers_secret_fields_are_known() -> None:
    from drivers import registry

    names = secret_field_names()
    for driver in registry.all_drivers().values():
        assert driver.settings_model.secret_fields() <= names, driver.power_type


def test_json_line_has_fields_and_context(capture: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, _ = capture
    with log_context(job_id="j1", action="on"):
        with log_context(node="n1", rack="r1", power_type="ipmi", ignored=None):
            logger.info("powering %s with power_pass=%s", "n1", SECRET)
            assert "ignored" not in current_context()
        logger.warning("chunk done")
    logger.info("outside")
    first, second, third = lines(stream)
    assert first["msg"] == "powering n1 with power_pass=***"
    assert first["level"] == "INFO" and first["logger"] == "powerq.test.logs"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert {k: first[k] for k in ("job_id", "node", "rack", "power_type", "action")} == {
        "job_id": "j1", "node": "n1", "rack": "r1", "power_type": "ipmi", "action": "on"}
    assert second["job_id"] == "j1" and "node" not in second
    assert "job_id" not in third


def test_extra_fields_and_tracebacks(capture: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, _ = capture
    try:
        raise RuntimeError(f"login failed: password={SECRET}")
    except RuntimeError:
        logger.exception("call failed", extra={"node": "n7"})
    (line,) = lines(stream)
    assert line["node"] == "n7" and "RuntimeError" in line["exc"]
    assert SECRET not in stream.getvalue()


def test_context_does_not_leak_between_threads(
        capture: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, _ = capture
    with log_context(node="main"):
        worker = threading.Thread(target=lambda: logger.info("from a bare thread"))
        worker.start()
        worker.join()
    assert "node" not in lines(stream)[0]


def test_text_format_and_setup_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    try:
        setup_logging("json", "INFO", stream=io.StringIO())
        handler = setup_logging("text", "DEBUG", stream=stream)
        ours = [h for h in root.handlers if getattr(h, "_powerq", False)]
        assert ours == [handler] and isinstance(handler.formatter, TextFormatter)
        with log_context(node="n2"):
            logging.getLogger("powerq.test.text").debug("token %s", f"pqt.x.{SECRET}")
        out = stream.getvalue()
        assert "DEBUG powerq.test.text token pqt.*** [node=n2]" in out and SECRET not in out
        with pytest.raises(ValueError):
            setup_logging("xml")
    finally:
        for h in [h for h in root.handlers if getattr(h, "_powerq", False)]:
            root.removeHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)


def test_config_option() -> None:
    assert Config.from_env({"POWERQ_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="POWERQ_LOG_FORMAT"):
        Config.from_env({"POWERQ_LOG_FORMAT": "xml"})


def test_celery_logging_goes_through_our_handler() -> None:
    """workers/app.py answers Celery's setup_logging signal: Celery then adds no handler of
    its own and its records reach the JSON handler."""
    from workers.app import _LOGGING, make_app

    root = logging.getLogger()
    level, before = root.level, _LOGGING["format"]
    try:
        make_app(Config(log_format="json"))
        replies = signals.setup_logging.send(sender=None, loglevel="INFO")
        assert replies  # non-empty: Celery leaves logging alone
        ours = [h for h in root.handlers if getattr(h, "_powerq", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    finally:
        _LOGGING["format"] = before
        for h in [h for h in root.handlers if getattr(h, "_powerq", False)]:
            root.removeHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)
