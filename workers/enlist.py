"""``powerq enlist``: give a node's BMC an account of powerq's own.

With the node's current (admin) credentials the driver creates, or resets, the BMC user
``username`` with a fresh random password; a second driver built with the new credentials
must then read the power state, and only then are they stored (sealed) as the node's
credentials, in front of the inventory's. The password is made here, in the worker: it
never travels in a message, a result or a log.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Callable
from typing import Any

from drivers.base import PowerDriver
from drivers.errors import PowerError
from scheduler.inventory import InventoryNode, InventoryStore
from workers.policy import NodeResult, NodeRunner, Outcome

PASSWORD_LENGTH = 16
"""IPMI 1.5-style passwords hold at most 16 bytes; every BMC takes 16 characters."""
_ALPHABET = string.ascii_letters + string.digits


def new_password() -> str:
    """16 random letters and digits (about 95 bits): what every BMC accepts."""
    while True:
        value = "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LENGTH))
        if any(c.isdigit() for c in value) and any(c.isupper() for c in value) and any(c.islower() for c in value):
            return value


def enlist(
    runner: NodeRunner, inventory: InventoryStore, record: InventoryNode, driver: PowerDriver,
    username: str, timeout: float, worker: str, on_act: Callable[[str], None] | None = None,
) -> NodeResult:
    """Create the account, prove it works, store it. Never raises."""
    result = NodeResult(node=record.name, action="enlist", started=time.time(), worker=worker,
                        power_type=record.power_type)
    try:
        password = new_password()
        if on_act is not None:
            on_act("enlist")
        updates: dict[str, Any] = runner.call(
            driver, lambda: driver.create_user(username, password), result, retry=False)
        cls = type(driver)
        fresh = cls(cls.validate({**record.params, **updates}), timeout=timeout)
        try:
            state = runner.call(fresh, fresh.query, result)
        finally:
            fresh.close()
        secret_fields = cls.settings_model.secret_fields()
        inventory.set_enlisted(record.name, record.power_type, updates, secret_fields)
        result.state_after = str(state)
        result.note = f"enlisted as BMC user {username}"
    except PowerError as exc:
        result.outcome = Outcome.ERROR
        result.error = exc.to_dict()
        result.error["attempt"] = result.attempts
    result.finished = time.time()
    return result
