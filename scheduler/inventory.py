"""The inventory: which nodes exist, in which rack, behind which power device.

An operator writes it as YAML (documented in ``deploy/inventory.example.yaml``);
:func:`load_inventory` checks every node at once and either returns a whole
:class:`Inventory` or raises one :class:`InventoryError` listing every problem.
:class:`InventoryStore` keeps the loaded inventory in Redis with each secret parameter
encrypted on its own, so that workers can resolve a node's parameters by name and the
scheduler can plan without ever decrypting anything.

Redis layout (``<prefix>`` is :attr:`Config.key_prefix`), replaced as a whole by each save:

- ``<prefix>:inventory`` hash: node name -> JSON ``{"rack", "power_type", "params",
  "tags", "pdu", "priority"}``; a secret parameter is stored as ``{"$enc": "<fernet token>"}``
- ``<prefix>:inventory:index`` hash: node name -> JSON ``{"rack", "power_type", "tags",
  "pdu", "priority"}`` (what planning and node-set groups need; no parameters at all)
- ``<prefix>:inventory:meta`` hash: ``loaded_at`` (epoch seconds), ``count``, ``source``,
  ``stamp`` (a random token new at each save: :meth:`InventoryStore.stamp`), and
  ``budgets`` (JSON of :meth:`Budgets.to_dict`) when the inventory declares any

Only :mod:`drivers.registry` and the drivers' settings models are needed: no protocol
library (pyghmi, sushy, libvirt) is imported.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import yaml
from pydantic import SecretStr

from drivers import registry
from drivers.base import DriverSettings, PowerDriver
from drivers.errors import SettingsError

from .budget import DEFAULT_PRIORITY, BudgetError, Budgets, parse_budgets
from .nodeset import NodeSetError, Resolver, expand, natural_key, natural_sorted
from .secrets import SecretBox

__all__ = [
    "GROUP_KINDS",
    "Inventory",
    "InventoryError",
    "InventoryNode",
    "InventoryStore",
    "NodeInfo",
    "Problem",
    "index_resolver",
    "load_inventory",
]

NAME_RE = re.compile(r"[A-Za-z0-9._-]+\Z")
"""Node names, rack names and tags: a rack name becomes the queue ``powerq.rack.<rack>``."""

GROUP_KINDS = ("all", "rack", "type", "tag")
"""Node-set groups the inventory resolves: ``@all``, ``@rack:X``, ``@type:Y``, ``@tag:Z``."""

_TOP_KEYS = ("nodes", "secrets_file", "defaults", "budgets")
_NODE_KEYS = ("name", "rack", "power_type", "power_parameters", "tags", "pdu", "priority")
_ENC = "$enc"
_JSON = "$json"
_INVENTORY = "(inventory)"
_BUDGETS = "(budgets)"


# --------------------------------------------------------------------------- records


class Problem(TypedDict):
    """One reason the inventory was refused. Never holds a secret value."""

    node: str
    """The node's name, ``#<n>`` (its 1-based entry) when it has no usable name, or
    ``(inventory)`` / ``(defaults)`` / ``(budgets)`` for the file as a whole."""
    field: str
    """The key or power parameter at fault, or ``""``."""
    reason: str


class InventoryError(SettingsError):
    """The inventory cannot be loaded; ``problems`` lists every reason at once."""

    code = "bad_inventory"
    default_message = "invalid inventory"

    def __init__(
        self, message: str | None = None, *, problems: list[Problem] | None = None, **details: Any
    ) -> None:
        self.problems: list[Problem] = list(problems or [])
        if self.problems:
            details["problems"] = self.problems
        super().__init__(message, **details)


class NodeInfo(NamedTuple):
    """What the scheduler knows of a node without its parameters.

    New fields are only ever added at the end, with defaults: ``info[0]``, ``info[1]``,
    ``info[2]`` stay rack, power type and tags."""

    rack: str
    power_type: str
    tags: tuple[str, ...]
    pdu: str | None = None
    """The PDU or circuit the node draws from (for power budgets), if the inventory says."""
    priority: int = DEFAULT_PRIORITY
    """Power-on order: lower values start first."""


@dataclass(frozen=True, repr=False)
class InventoryNode:
    """One node with its power parameters; secret ones are held in clear, in memory only."""

    name: str
    rack: str
    power_type: str
    params: dict[str, Any]
    """MAAS power parameters, normalised by the driver's settings model; secrets in clear."""
    tags: tuple[str, ...] = ()
    secret_fields: frozenset[str] = frozenset()
    """Which of ``params`` are secret (encrypted at rest, masked on display)."""
    pdu: str | None = None
    """The PDU or circuit the node draws from, for power budgets; None if not given."""
    priority: int = DEFAULT_PRIORITY
    """Power-on order: lower values start first."""

    @property
    def info(self) -> NodeInfo:
        return NodeInfo(self.rack, self.power_type, self.tags, self.pdu, self.priority)

    def public_params(self) -> dict[str, Any]:
        """``params`` with every non-empty secret replaced by ``"***"``."""
        return {
            k: ("***" if k in self.secret_fields and v not in (None, "") else v)
            for k, v in self.params.items()
        }

    def public_dict(self) -> dict[str, Any]:
        """The node as plain data, secrets masked: safe to print, log or return."""
        return {
            "name": self.name,
            "rack": self.rack,
            "power_type": self.power_type,
            "params": self.public_params(),
            "tags": list(self.tags),
            "pdu": self.pdu,
            "priority": self.priority,
        }

    def driver_class(self) -> type[PowerDriver]:
        """The driver of this node's power type. Raises :class:`UnknownPowerTypeError`."""
        return registry.get(self.power_type)

    def settings(self) -> DriverSettings:
        """The typed driver settings. Raises :class:`SettingsError` if they no longer validate."""
        return self.driver_class().validate(self.params)

    def __repr__(self) -> str:
        return (
            f"InventoryNode(name={self.name!r}, rack={self.rack!r}, "
            f"power_type={self.power_type!r}, params={self.public_params()!r}, "
            f"tags={self.tags!r}, pdu={self.pdu!r}, priority={self.priority!r})"
        )


def index_resolver(index: Mapping[str, NodeInfo]) -> Resolver:
    """A node-set group resolver over ``index`` (for :func:`scheduler.nodeset.expand`).

    The resolver answers ``@all``, ``@rack:X``, ``@type:Y`` and ``@tag:Z``, and raises
    :class:`NodeSetError` for another kind, a missing value, or a value no node has (so
    that a mistyped group never silently means "no node", as in ``@all!@rack:r1x``).
    """
    groups: dict[str, dict[str, set[str]]] = {"rack": {}, "type": {}, "tag": {}}
    for name, info in index.items():
        groups["rack"].setdefault(info.rack, set()).add(name)
        groups["type"].setdefault(info.power_type, set()).add(name)
        for tag in info.tags:
            groups["tag"].setdefault(tag, set()).add(name)
    everything = set(index)
    nouns = {"rack": "rack", "type": "power type", "tag": "tag"}

    def resolve(kind: str, value: str) -> set[str]:
        if kind == "all":
            if value:
                raise NodeSetError("@all takes no value")
            return set(everything)
        if kind not in groups:
            raise NodeSetError(
                f"unknown group kind {kind!r} (known: @all, @rack:X, @type:Y, @tag:Z)"
            )
        if not value:
            raise NodeSetError(f"@{kind} needs a value, e.g. @{kind}:name")
        try:
            return set(groups[kind][value])
        except KeyError:
            raise NodeSetError(f"no node has {nouns[kind]} {value!r}") from None

    return resolve


@dataclass
class Inventory:
    """A whole, valid inventory, as :func:`load_inventory` returns it."""

    nodes: dict[str, InventoryNode]
    source: str = ""
    """Where it was read from (a path), for display."""
    budgets: Budgets = field(default_factory=Budgets)
    """The power budgets of the top-level ``budgets:`` (none when absent)."""

    def __len__(self) -> int:
        return len(self.nodes)

    def names(self) -> list[str]:
        """Node names in natural order."""
        return natural_sorted(self.nodes)

    def racks(self) -> list[str]:
        """Rack names in natural order."""
        return sorted({n.rack for n in self.nodes.values()}, key=natural_key)

    def nodes_by_rack(self) -> dict[str, list[str]]:
        """Rack name -> its node names (natural order)."""
        out: dict[str, list[str]] = {rack: [] for rack in self.racks()}
        for name in self.names():
            out[self.nodes[name].rack].append(name)
        return out

    def index(self) -> dict[str, NodeInfo]:
        """Node name -> (rack, power_type, tags, pdu, priority)."""
        return {name: node.info for name, node in self.nodes.items()}

    @cached_property
    def _resolver(self) -> Resolver:
        return index_resolver(self.index())

    def resolver(self, kind: str, value: str) -> set[str]:
        """Names in group ``@kind:value`` (``@all`` is ``("all", "")``).

        Raises :class:`NodeSetError` for an unknown kind or a value no node has.
        """
        return self._resolver(kind, value)

    def expand(self, expr: str) -> list[str]:
        """:func:`scheduler.nodeset.expand` with this inventory's groups. Raises NodeSetError."""
        return expand(expr, self.resolver)


# --------------------------------------------------------------------------- loading


def _yaml_reason(exc: Exception) -> str:
    """A YAML error as 'line L column C: problem', without quoting the offending text
    (the line may hold a password)."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character {exc.position}: {exc.reason}"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "not valid YAML"
    if mark is not None:
        return f"line {mark.line + 1} column {mark.column + 1}: {problem}"
    if isinstance(exc, RecursionError):
        return "not valid YAML (nested too deeply)"
    if isinstance(exc, ValueError):
        return "not valid YAML (a number too long to read)"
    return "not valid YAML"


def _read_yaml(path: Path, what: str, loader: type[Any]) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InventoryError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise InventoryError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - Safe/BaseLoader only
    except (yaml.YAMLError, RecursionError, ValueError) as exc:  # ValueError: int() limit
        raise InventoryError(f"{what} {path}: {_yaml_reason(exc)}") from None


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "empty"}.get(
        type(value), f"a {type(value).__name__}"
    )


class _Loader:
    """One load: collects problems instead of stopping at the first."""

    def __init__(self, path: Path, secrets_path: Path | None, environ: Mapping[str, str]) -> None:
        self.path = path
        self.secrets_path = secrets_path
        self.environ = environ
        self.problems: list[Problem] = []
        self.secrets: dict[str, Any] | None = None
        self.secrets_error: str | None = None
        self.racks_named: set[str] = set()
        """Every rack and PDU some entry names, valid or not (to check budgets against)."""
        self.pdus_named: set[str] = set()

    def problem(self, node: str, field: str, reason: str) -> None:
        self.problems.append(Problem(node=node, field=field, reason=reason))

    def load(self) -> Inventory:
        doc = _read_yaml(self.path, "inventory", yaml.SafeLoader)
        if doc is None:
            raise InventoryError(
                f"inventory {self.path} is empty: it needs a top-level 'nodes:' list"
            )
        if not isinstance(doc, dict):
            raise InventoryError(
                f"inventory {self.path} must be a mapping with a top-level 'nodes:' list, "
                f"not {_type_name(doc)}"
            )
        for key in doc:
            if key not in _TOP_KEYS:
                self.problem(
                    _INVENTORY, str(key), f"unknown top-level key (expected {', '.join(_TOP_KEYS)})"
                )
        entries = doc.get("nodes")
        if not isinstance(entries, list):
            raise InventoryError(
                f"inventory {self.path}: 'nodes:' must be a list of nodes, not {_type_name(entries)}"
            )
        self.load_secrets(doc.get("secrets_file"))
        defaults = self.load_defaults(doc.get("defaults"))

        nodes: dict[str, InventoryNode] = {}
        first_entry: dict[str, int] = {}
        for number, entry in enumerate(entries, 1):
            node = self.load_node(number, entry, defaults, first_entry)
            if node is not None:
                nodes[node.name] = node
        self.check_targets(nodes)
        budgets = self.load_budgets(doc.get("budgets"))
        if self.problems:
            raise InventoryError(self.summary(), problems=self.problems)
        return Inventory(nodes=nodes, source=str(self.path), budgets=budgets)

    def summary(self) -> str:
        count = len(self.problems)
        lines = [
            f"inventory {self.path}: {count} problem{'s' if count != 1 else ''}, nothing loaded"
        ]
        for p in self.problems:
            where = f"{p['node']}: {p['field']}" if p["field"] else p["node"]
            lines.append(f"  {where}: {p['reason']}")
        return "\n".join(lines)

    # -- secrets file and defaults

    def load_secrets(self, declared: Any) -> None:
        path = self.secrets_path
        if path is None and declared is not None:
            if not isinstance(declared, str) or not declared:
                self.problem(_INVENTORY, "secrets_file", "must be a path (a string)")
                return
            path = Path(declared).expanduser()
            if not path.is_absolute():
                path = self.path.parent / path
        if path is None:
            return
        try:
            data = _read_yaml(path, "secrets file", yaml.BaseLoader)  # every scalar a string
        except InventoryError as exc:
            self.secrets_error = exc.message
            self.problem(_INVENTORY, "secrets_file", exc.message)
            return
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.secrets_error = f"secrets file {path} must be a mapping of key: value"
            self.problem(_INVENTORY, "secrets_file", self.secrets_error)
            return
        self.secrets = data

    def load_defaults(self, raw: Any) -> dict[str, dict[str, Any]]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(_INVENTORY, "defaults", "must map power_type to parameters")
            return {}
        out: dict[str, dict[str, Any]] = {}
        for power_type, params in raw.items():
            where = f"defaults.{power_type}"
            try:
                driver = registry.get(str(power_type))
            except SettingsError as exc:
                self.problem("(defaults)", where, exc.message)
                continue
            except ImportError as exc:
                self.problem("(defaults)", where, f"power drivers failed to load: {exc}")
                continue
            if not isinstance(params, dict):
                self.problem(
                    "(defaults)",
                    where,
                    f"must be a mapping of parameters, not {_type_name(params)}",
                )
                continue
            fields = driver.settings_model.model_fields
            node_scoped = driver.settings_model.node_fields()
            kept: dict[str, Any] = {}
            for key, value in params.items():
                if key not in fields:
                    self.problem("(defaults)", f"{where}.{key}", f"not a {power_type} parameter")
                elif key in node_scoped:
                    self.problem(
                        "(defaults)", f"{where}.{key}", "a per-node parameter cannot be a default"
                    )
                else:
                    kept[key] = value
            out[str(power_type)] = kept
        return out

    def load_budgets(self, raw: Any) -> Budgets:
        """The ``budgets:`` section; a rack or PDU named there must be one some node names."""
        budgets = Budgets()
        try:
            budgets = parse_budgets(raw)
        except BudgetError as exc:
            for path, reason in exc.problems:
                self.problem(_BUDGETS, path, reason)
        if not isinstance(raw, dict):
            return budgets
        for section, named, noun in (
            ("racks", self.racks_named, "no node is in rack"),
            ("pdus", self.pdus_named, "no node draws from PDU"),
        ):
            entries = raw.get(section)
            for name in entries if isinstance(entries, dict) else ():
                if isinstance(name, str) and name not in named:
                    self.problem(_BUDGETS, f"budgets.{section}.{name}", f"{noun} {name!r}")
        return budgets

    def resolve_ref(self, ref: dict[Any, Any]) -> tuple[Any, str | None]:
        """``({env: VAR} | {file: key})`` -> (value, None) or (None, reason)."""
        if len(ref) != 1 or next(iter(ref)) not in ("env", "file"):
            return None, "a mapping value must be {env: VARIABLE} or {file: key}"
        kind, name = next(iter(ref.items()))
        if not isinstance(name, str) or not name:
            return None, f"{{{kind}: ...}} needs a name (a string)"
        if kind == "env":
            if name not in self.environ:
                return None, f"environment variable {name} is not set"
            return self.environ[name], None
        if self.secrets is None:
            if self.secrets_error:
                return None, f"secrets file key {name!r}: the secrets file could not be read"
            return None, (
                f"secrets file key {name!r} given but no secrets file "
                "(top-level secrets_file: or --secrets)"
            )
        if name not in self.secrets:
            return None, f"key {name!r} not found in the secrets file"
        value = self.secrets[name]
        if not isinstance(value, str):
            return None, f"key {name!r} in the secrets file is not a single value"
        return value, None

    # -- nodes

    def check_name(self, label: str, key: str, value: Any) -> str | None:
        if value is None:
            self.problem(label, key, "required")
        elif not isinstance(value, str):
            self.problem(label, key, f"must be a string, not {_type_name(value)} (quote it)")
        elif not NAME_RE.match(value):
            self.problem(label, key, "must be letters, digits, '.', '_' or '-'")
        else:
            return value
        return None

    def load_node(
        self,
        number: int,
        entry: Any,
        defaults: dict[str, dict[str, Any]],
        first_entry: dict[str, int],
    ) -> InventoryNode | None:
        before = len(self.problems)
        label = f"#{number}"
        if not isinstance(entry, dict):
            self.problem(
                label,
                "",
                f"a node must be a mapping ({', '.join(_NODE_KEYS)}), not {_type_name(entry)}",
            )
            return None
        raw_name = entry.get("name")
        if isinstance(raw_name, str) and NAME_RE.match(raw_name):
            label = raw_name
        name = self.check_name(label, "name", raw_name)
        if name is not None:
            if name in first_entry:
                self.problem(label, "name", f"duplicate name (also entry #{first_entry[name]})")
            else:
                first_entry[name] = number
        for key in entry:
            if key not in _NODE_KEYS:
                self.problem(label, str(key), f"unknown key (expected {', '.join(_NODE_KEYS)})")
        rack = self.check_name(label, "rack", entry.get("rack"))
        if rack is not None:
            self.racks_named.add(rack)
        tags = self.load_tags(label, entry.get("tags"))
        pdu: str | None = None
        if entry.get("pdu") is not None:
            pdu = self.check_name(label, "pdu", entry["pdu"])
            if pdu is not None:
                self.pdus_named.add(pdu)
        priority = self.load_priority(label, entry.get("priority"))

        driver: type[PowerDriver] | None = None
        power_type = entry.get("power_type")
        if power_type is None:
            self.problem(label, "power_type", "required")
        elif not isinstance(power_type, str):
            self.problem(label, "power_type", f"must be a string, not {_type_name(power_type)}")
        else:
            try:
                driver = registry.get(power_type)
            except SettingsError as exc:
                self.problem(label, "power_type", exc.message)
            except ImportError as exc:
                self.problem(label, "power_type", f"power drivers failed to load: {exc}")

        raw_params = entry.get("power_parameters")
        if raw_params is None:
            raw_params = {}
        if not isinstance(raw_params, dict):
            self.problem(
                label, "power_parameters", f"must be a mapping, not {_type_name(raw_params)}"
            )
            return None
        if driver is None:
            return None
        settings = self.validate_params(
            label, driver, {**defaults.get(driver.power_type, {}), **raw_params}
        )
        if settings is None or len(self.problems) > before or name is None or rack is None:
            return None
        model = driver.settings_model
        params = settings.model_dump(mode="json", exclude_unset=True)
        secret_fields = model.secret_fields() & params.keys()
        for key in secret_fields:
            value = getattr(settings, key)
            params[key] = value.get_secret_value() if isinstance(value, SecretStr) else value
        return InventoryNode(
            name=name,
            rack=rack,
            power_type=driver.power_type,
            params=params,
            tags=tags,
            secret_fields=frozenset(secret_fields),
            pdu=pdu,
            priority=priority,
        )

    def load_priority(self, label: str, raw: Any) -> int:
        if raw is None:
            return DEFAULT_PRIORITY
        if isinstance(raw, bool) or not isinstance(raw, int):
            self.problem(label, "priority", f"must be a whole number, not {_type_name(raw)}")
            return DEFAULT_PRIORITY
        if not -1_000_000 <= raw <= 1_000_000:
            self.problem(label, "priority", "must be between -1000000 and 1000000")
            return DEFAULT_PRIORITY
        return raw

    def load_tags(self, label: str, raw: Any) -> tuple[str, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.problem(label, "tags", f"must be a list, not {_type_name(raw)}")
            return ()
        tags: list[str] = []
        for tag in raw:
            if isinstance(tag, str) and NAME_RE.match(tag):
                if tag not in tags:
                    tags.append(tag)
            else:
                self.problem(label, "tags", "each tag must be letters, digits, '.', '_' or '-'")
        return tuple(tags)

    def validate_params(
        self, label: str, driver: type[PowerDriver], params: dict[Any, Any]
    ) -> DriverSettings | None:
        resolved: dict[str, Any] = {}
        failed: set[str] = set()
        for key, value in params.items():
            if not isinstance(key, str):
                self.problem(label, "power_parameters", "parameter names must be strings")
                continue
            if isinstance(value, dict):
                value, reason = self.resolve_ref(value)
                if reason is not None:
                    self.problem(label, key, reason)
                    failed.add(key)
                    continue
            resolved[key] = value
        try:
            settings = driver.validate(resolved)
        except SettingsError as exc:
            listed = exc.details.get("problems") or [exc.message]
            for item in listed:
                key, sep, reason = str(item).partition(": ")
                if not sep:
                    key, reason = "power_parameters", str(item)
                if key not in failed:
                    self.problem(label, key, reason)
            return None
        except Exception as exc:  # a driver bug must not hide the other nodes' problems
            self.problem(
                label,
                "power_parameters",
                f"the {driver.power_type} driver failed to validate ({type(exc).__name__})",
            )
            return None
        return None if failed else settings

    def check_targets(self, nodes: dict[str, InventoryNode]) -> None:
        """Two nodes with the same power type and the same (non-secret) parameters would
        control one machine: refuse the later ones."""
        seen: dict[str, str] = {}
        for node in nodes.values():
            public = {k: v for k, v in node.params.items() if k not in node.secret_fields}
            if not public:
                continue
            key = node.power_type + json.dumps(public, sort_keys=True, default=str)
            if key in seen:
                self.problem(
                    node.name,
                    "power_parameters",
                    f"same power parameters as node {seen[key]}: both would control one machine",
                )
            else:
                seen[key] = node.name


def load_inventory(
    path: str | os.PathLike[str],
    *,
    secrets_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Inventory:
    """Read and check an inventory YAML file; all of it or nothing.

    ``{env: VAR}`` references are read from ``environ`` (default ``os.environ``);
    ``{file: key}`` references from ``secrets_path`` when given, else from the file's
    top-level ``secrets_file:`` (relative to the inventory's directory).

    Raises :class:`InventoryError` (code ``bad_inventory``) when the file cannot be read,
    is not valid YAML or has the wrong shape, or when any node is invalid: then
    ``problems`` lists every invalid node and reason at once. No message contains a
    secret value, nor the text of a YAML line.
    """
    loader = _Loader(
        Path(path),
        Path(secrets_path).expanduser() if secrets_path is not None else None,
        os.environ if environ is None else environ,
    )
    return loader.load()


# --------------------------------------------------------------------------- store


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _pdu(data: Mapping[str, Any]) -> str | None:
    pdu = data.get("pdu")
    return None if pdu is None else str(pdu)


def _priority(data: Mapping[str, Any]) -> int:
    """A stored priority (entries saved before priorities existed have none)."""
    value = data.get("priority", DEFAULT_PRIORITY)
    return value if isinstance(value, int) and not isinstance(value, bool) else DEFAULT_PRIORITY


class InventoryStore:
    """The loaded inventory in Redis, secrets encrypted one by one with ``box``.

    ``client`` is a ``redis.Redis`` (``decode_responses`` either way).
    """

    def __init__(
        self,
        client: Any,
        prefix: str,
        box: SecretBox,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._box = box
        self._clock = clock
        self.key = f"{prefix}:inventory"
        self.index_key = f"{prefix}:inventory:index"
        self.meta_key = f"{prefix}:inventory:meta"
        self.enlisted_key = f"{prefix}:inventory:enlisted"
        """Credentials ``powerq enlist`` created, per node: they outlive inventory reloads."""

    # -- writing

    def _seal(self, values: Mapping[str, Any], secret_fields: Iterable[str]) -> dict[str, Any]:
        secret = set(secret_fields)
        params: dict[str, Any] = {}
        for key, value in values.items():
            if key in secret and value not in (None, ""):
                if isinstance(value, str):
                    params[key] = {_ENC: self._box.encrypt(value)}
                else:
                    params[key] = {_ENC: self._box.encrypt(json.dumps(value)), _JSON: True}
            else:
                params[key] = value
        return params

    def _encode(self, node: InventoryNode) -> str:
        params: dict[str, Any] = {}
        for key, value in node.params.items():
            if key in node.secret_fields and value not in (None, ""):
                if isinstance(value, str):
                    params[key] = {_ENC: self._box.encrypt(value)}
                else:  # a secret that is not a string: keep its JSON type
                    params[key] = {_ENC: self._box.encrypt(json.dumps(value)), _JSON: True}
            else:
                params[key] = value
        return json.dumps(
            {
                "rack": node.rack,
                "power_type": node.power_type,
                "params": params,
                "tags": list(node.tags),
                "pdu": node.pdu,
                "priority": node.priority,
            },
            sort_keys=True,
        )

    def save(self, inventory: Inventory) -> None:
        """Replace the stored inventory with ``inventory`` in one MULTI/EXEC transaction.

        Raises ``redis.RedisError`` when Redis fails (nothing is then replaced).
        """
        entries = {name: self._encode(node) for name, node in inventory.nodes.items()}
        index = {
            name: json.dumps(
                {
                    "rack": node.rack,
                    "power_type": node.power_type,
                    "tags": list(node.tags),
                    "pdu": node.pdu,
                    "priority": node.priority,
                },
                sort_keys=True,
            )
            for name, node in inventory.nodes.items()
        }
        meta = {
            "loaded_at": repr(self._clock()),
            "count": str(len(entries)),
            "source": inventory.source,
            "stamp": uuid.uuid4().hex,
        }
        if inventory.budgets:
            meta["budgets"] = json.dumps(inventory.budgets.to_dict(), sort_keys=True)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.key, self.index_key, self.meta_key)
        if entries:
            pipe.hset(self.key, mapping=entries)
            pipe.hset(self.index_key, mapping=index)
        pipe.hset(self.meta_key, mapping=meta)
        pipe.execute()

    def clear(self) -> None:
        """Delete the stored inventory. Raises ``redis.RedisError``."""
        self._redis.delete(self.key, self.index_key, self.meta_key)

    # -- reading

    @staticmethod
    def _parse(name: str, raw: Any) -> dict[str, Any]:
        try:
            data = json.loads(_text(raw))
            if not isinstance(data, dict) or not isinstance(data.get("params", {}), dict):
                raise ValueError
            return data
        except ValueError:
            raise SettingsError(
                f"stored inventory entry of node {name!r} is damaged: load the inventory again"
            ) from None

    def _decode(self, name: str, raw: Any) -> InventoryNode:
        data = self._parse(name, raw)
        params: dict[str, Any] = {}
        secret: set[str] = set()
        for key, value in data.get("params", {}).items():
            if isinstance(value, dict) and _ENC in value:
                try:
                    clear = self._box.decrypt(value[_ENC])
                    params[key] = json.loads(clear) if value.get(_JSON) else clear
                except SettingsError as exc:
                    raise SettingsError(f"node {name} {key}: {exc.message}") from None
                except ValueError:
                    raise SettingsError(f"node {name} {key}: stored secret is damaged") from None
                secret.add(key)
            else:
                params[key] = value
        return InventoryNode(
            name=name,
            rack=str(data.get("rack", "")),
            power_type=str(data.get("power_type", "")),
            params=params,
            tags=tuple(data.get("tags", ())),
            secret_fields=frozenset(secret),
            pdu=_pdu(data),
            priority=_priority(data),
        )

    # -- enlisted credentials

    def set_enlisted(
        self, name: str, power_type: str, updates: Mapping[str, Any], secret_fields: Iterable[str]
    ) -> None:
        """Record credentials created for ``name`` by ``powerq enlist`` (secrets sealed).
        They take precedence over the inventory's parameters, across reloads, while the
        node keeps ``power_type``. Raises ``redis.RedisError``."""
        record = {"power_type": power_type, "at": self._clock(),
                  "params": self._seal(updates, secret_fields)}
        self._redis.hset(self.enlisted_key, name, json.dumps(record, sort_keys=True))

    def forget_enlisted(self, names: Iterable[str]) -> int:
        """Drop enlisted credentials (the inventory's apply again). Returns how many."""
        wanted = list(names)
        return int(self._redis.hdel(self.enlisted_key, *wanted)) if wanted else 0

    def enlisted(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Which of ``names`` have enlisted credentials: ``{name: {"at", "power_type",
        "fields"}}``, decrypting nothing."""
        wanted = list(dict.fromkeys(names))
        out: dict[str, dict[str, Any]] = {}
        if not wanted:
            return out
        for name, raw in zip(wanted, self._redis.hmget(self.enlisted_key, wanted), strict=True):
            if raw is not None:
                data = self._parse(name, raw)
                out[name] = {"at": data.get("at"), "power_type": data.get("power_type"),
                             "fields": sorted(data.get("params", {}))}
        return out

    def _with_enlisted(self, node: InventoryNode, raw: Any) -> InventoryNode:
        if raw is None:
            return node
        data = self._parse(node.name, raw)
        if data.get("power_type") != node.power_type:
            return node  # the node changed power type since: its old account no longer applies
        extra = self._decode(node.name, json.dumps({"params": data.get("params", {})}))
        return replace(node, params={**node.params, **extra.params},
                       secret_fields=node.secret_fields | extra.secret_fields)

    def load_node(self, name: str) -> InventoryNode | None:
        """The node with its secrets decrypted (for a worker), or None if unknown.
        Enlisted credentials replace the inventory's.

        Raises :class:`SettingsError` when a secret cannot be decrypted with the
        configured key or the entry is damaged; ``redis.RedisError`` when Redis fails.
        """
        return self.load_nodes([name]).get(name)

    def load_nodes(self, names: Iterable[str]) -> dict[str, InventoryNode]:
        """The named nodes, secrets decrypted, with one HMGET each for the inventory and
        the enlisted credentials; unknown names are left out.

        Raises as :meth:`load_node`.
        """
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(self.key, wanted)
        pipe.hmget(self.enlisted_key, wanted)
        values, enlisted = pipe.execute()
        return {
            n: self._with_enlisted(self._decode_cached(n, raw), extra)
            for n, raw, extra in zip(wanted, values, enlisted, strict=True)
            if raw is not None
        }

    _DECODED_MAX = 50_000

    def _decode_cached(self, name: str, raw: Any) -> InventoryNode:
        """:meth:`_decode`, remembered by the stored entry itself (issue 4): a worker reading
        the same rack every poll decrypts and parses each node once, not every time. A
        changed entry (new parameters, a re-encrypted secret) is a new key; the cache is
        bounded and lives in this process' memory only, like the decoded node itself."""
        cache: dict[tuple[str, Any], InventoryNode] = self.__dict__.setdefault("_decoded", {})
        key = (name, raw)
        node = cache.get(key)
        if node is None:
            node = self._decode(name, raw)
            if len(cache) >= self._DECODED_MAX:
                cache.clear()
            cache[key] = node
        return node

    def node_index(self) -> dict[str, NodeInfo]:
        """Every node's (rack, power_type, tags, pdu, priority), decrypting nothing: for
        planning and groups.

        Raises :class:`SettingsError` for a damaged entry, ``redis.RedisError``.
        """
        out: dict[str, NodeInfo] = {}
        for raw_name, raw in self._redis.hgetall(self.index_key).items():
            name = _text(raw_name)
            data = self._parse(name, raw)
            out[name] = NodeInfo(
                str(data.get("rack", "")),
                str(data.get("power_type", "")),
                tuple(data.get("tags", ())),
                _pdu(data),
                _priority(data),
            )
        return out

    def resolver(self) -> Resolver:
        """A node-set group resolver over the stored index (see :func:`index_resolver`)."""
        return index_resolver(self.node_index())

    def public_view(self, name: str) -> dict[str, Any] | None:
        """The node as plain data with secrets shown as ``"***"``, decrypting nothing;
        None if unknown. Raises :class:`SettingsError` for a damaged entry."""
        raw = self._redis.hget(self.key, name)
        if raw is None:
            return None
        data = self._parse(name, raw)
        params = {
            k: ("***" if isinstance(v, dict) and _ENC in v else v)
            for k, v in data.get("params", {}).items()
        }
        view = {
            "name": name,
            "rack": data.get("rack", ""),
            "power_type": data.get("power_type", ""),
            "params": params,
            "tags": list(data.get("tags", ())),
            "pdu": _pdu(data),
            "priority": _priority(data),
        }
        raw_enlisted = self._redis.hget(self.enlisted_key, name)
        if raw_enlisted is not None:
            extra = self._parse(name, raw_enlisted)
            if extra.get("power_type") == view["power_type"]:
                for k, v in extra.get("params", {}).items():
                    params[k] = "***" if isinstance(v, dict) and _ENC in v else v
                view["enlisted_at"] = extra.get("at")
        return view

    def stamp(self) -> str | None:
        """A token that changes with every save (None if nothing is stored): one HGET, to
        notice a reloaded inventory. Raises ``redis.RedisError``."""
        raw = self._redis.hget(self.meta_key, "stamp")
        return None if raw is None else _text(raw)

    def budgets(self) -> Budgets:
        """The stored power budgets (empty when none), decrypting nothing: one HGET.

        Raises :class:`SettingsError` when the stored budgets are damaged,
        ``redis.RedisError`` when Redis fails.
        """
        raw = self._redis.hget(self.meta_key, "budgets")
        if raw is None:
            return Budgets()
        try:
            return parse_budgets(json.loads(_text(raw)))
        except (ValueError, SettingsError):
            raise SettingsError(
                "stored power budgets are damaged: load the inventory again"
            ) from None

    def meta(self) -> dict[str, str]:
        """``loaded_at`` (epoch seconds), ``count``, ``source`` and ``stamp`` of the last
        save, and ``budgets`` (JSON) if it had any; {} if none. Raises ``redis.RedisError``."""
        return {_text(k): _text(v) for k, v in self._redis.hgetall(self.meta_key).items()}
