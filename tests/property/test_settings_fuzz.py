"""Every registered driver's ``validate`` over arbitrary parameters: typed settings or a
:class:`SettingsError`, never another exception, and never a secret in the message."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import registry
from drivers.base import DriverSettings, PowerDriver
from drivers.errors import SettingsError
from tests.property.strategies import odd_text, secrets, values

DRIVERS = registry.all_drivers()


def _secret_texts(value: Any) -> list[str]:
    """The marked secret strings inside ``value`` (a secret may arrive nested)."""
    if isinstance(value, str):
        return [value] if value.startswith("Zk") else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _secret_texts(v)]
    if isinstance(value, list):
        return [s for v in value for s in _secret_texts(v)]
    return []


@st.composite
def parameters(draw: st.DrawFn, driver: type[PowerDriver]) -> dict[Any, Any]:
    """Parameters built from the driver's own field names (so that validators run),
    unknown names, and secret fields holding marked secrets (or odd values)."""
    model = driver.settings_model
    fields = sorted(model.model_fields)
    secret_fields = model.secret_fields()
    params: dict[Any, Any] = {}
    chosen = draw(st.lists(st.sampled_from(fields), unique=True)) if fields else []
    for name in chosen:
        if name in secret_fields:
            params[name] = draw(st.one_of(secrets, values, st.lists(secrets, max_size=2)))
        else:
            params[name] = draw(values)
    extra = draw(st.dictionaries(st.one_of(odd_text, st.integers()), values, max_size=2))
    for key, value in extra.items():
        params.setdefault(key, value)
    return params


def _check(driver: type[PowerDriver], params: dict[Any, Any], chassis: bool) -> None:
    secret = [s for k, v in params.items() if k in driver.settings_model.secret_fields()
              for s in _secret_texts(v)]
    try:
        settings = driver.validate_chassis(params) if chassis else driver.validate(params)
    except SettingsError as exc:
        text = f"{exc.message} {exc.details!r} {exc!r} {exc.to_dict()!r}"
        for value in secret:
            assert value not in text, f"{driver.power_type} echoes a secret in {text!r}"
        return
    assert isinstance(settings, DriverSettings)
    shown = f"{settings!r} {settings} {settings.public_dict()!r}"
    for value in secret:
        assert value not in shown, f"{driver.power_type} settings show a secret: {shown!r}"


@pytest.mark.parametrize("power_type", sorted(DRIVERS))
@given(data=st.data())
def test_validate_never_crashes_nor_leaks(power_type: str, data: st.DataObject) -> None:
    driver = DRIVERS[power_type]
    params = data.draw(parameters(driver), label="params")
    _check(driver, params, chassis=False)
    _check(driver, params, chassis=True)


@given(params=st.one_of(st.none(), values))
def test_validate_non_mappings(params: Any) -> None:
    """A parameter block that is not a mapping at all (a list, a number): only
    :class:`SettingsError`."""
    for driver in DRIVERS.values():
        try:
            driver.validate(params if isinstance(params, dict) else {"power_address": params})
        except SettingsError:
            pass
