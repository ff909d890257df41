"""Inventory files under bad input: generated documents, mutations of a valid inventory
(budgets, defaults, secret references, odd types, huge and unicode names) and damaged
text. :func:`load_inventory` returns an :class:`Inventory` or raises
:class:`InventoryError` (code ``bad_inventory``, every node problem listed); never
anything else, and never a secret in the message."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from scheduler.inventory import Inventory, InventoryError, load_inventory
from scheduler.nodeset import fold
from tests.property.strategies import odd_text, secrets, values

ENV_SECRET = "ZkEnvSecret01Qx"
FILE_SECRET = "ZkFileSecret02Qx"
INLINE_SECRET = "ZkInline03Qx"
ENVIRON = {"PQ_PASS": ENV_SECRET, "PQ_OTHER": "ZkOther04Qx"}
SECRETS_FILE = {"bmc": FILE_SECRET, "hv": "ZkHv05Qx", "nested": ["ZkNested06Qx"]}
ALL_SECRETS = [ENV_SECRET, FILE_SECRET, INLINE_SECRET, "ZkOther04Qx", "ZkHv05Qx", "ZkNested06Qx"]

BASE: dict[str, Any] = {
    "secrets_file": "secrets.yaml",
    "defaults": {"ipmi": {"power_user": "maas", "power_pass": {"env": "PQ_PASS"},
                          "cipher_suite_id": "3", "privilege_level": "OPERATOR"}},
    "budgets": {
        "pdu": {"max_starts": 8, "window": "10s"},
        "pdus": {"pdu-b": {"max_starts": 4, "window": "10s"}},
        "rack": {"max_starts": 20, "window": 10},
        "racks": {"lab": {"max_starts": 2, "window": "30s"}},
        "global": {"max_starts": 100, "window": "1m"},
    },
    "nodes": [
        {"name": "node001", "rack": "r12", "power_type": "ipmi",
         "power_parameters": {"power_address": "10.12.0.1", "mac_address": "52:54:00:12:00:01"},
         "tags": ["gpu", "prod"], "pdu": "pdu-a"},
        {"name": "node002", "rack": "r12", "power_type": "ipmi",
         "power_parameters": {"power_address": "10.12.0.2", "power_pass": {"file": "bmc"},
                              "power_boot_type": "efi"},
         "tags": ["prod"], "pdu": "pdu-b", "priority": 10},
        {"name": "node101", "rack": "r13", "power_type": "redfish",
         "power_parameters": {"power_address": "https://10.13.0.1", "power_user": "admin",
                              "power_pass": INLINE_SECRET, "node_id": "1"}},
        {"name": "vm01", "rack": "lab", "power_type": "virsh",
         "power_parameters": {"power_address": "qemu+ssh://ops@hv01/system",
                              "power_pass": {"file": "hv"}, "power_id": "vm01"}, "tags": ["lab"]},
        {"name": "pdu-node", "rack": "lab", "power_type": "apc",
         "power_parameters": {"power_address": "10.0.0.9", "node_outlet": 3,
                              "community": {"env": "PQ_OTHER"}}},
        {"name": "desk-7", "rack": "lab", "power_type": "manual"},
    ],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("inventory-fuzz")
    (path / "secrets.yaml").write_text(yaml.safe_dump(SECRETS_FILE))
    yield path


def test_base_inventory_loads(workdir: Path) -> None:
    """The base the mutations start from is valid (else they would test nothing)."""
    path = workdir / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    inventory = load_inventory(path, environ=ENVIRON)
    assert len(inventory) == len(BASE["nodes"])
    assert inventory.budgets


def _load(path: Path, secrets_path: Path | None = None) -> Inventory | None:
    try:
        inventory = load_inventory(path, secrets_path=secrets_path, environ=ENVIRON)
    except InventoryError as exc:
        assert exc.code == "bad_inventory" and exc.message
        text = f"{exc.message} {exc.problems!r} {exc.to_dict()!r} {exc!r}"
        for secret in ALL_SECRETS:
            assert secret not in text, f"a secret in the error: {text!r}"
        for problem in exc.problems:
            assert set(problem) == {"node", "field", "reason"}
            assert all(isinstance(v, str) for v in problem.values())
        json.dumps(exc.to_dict())  # plain data, as the CLI's --json prints it
        return None
    # A loaded inventory is usable all the way: groups, folding, settings, display.
    assert isinstance(inventory, Inventory)
    names = inventory.expand("@all") if inventory.nodes else []
    assert sorted(names) == sorted(inventory.nodes)
    fold(names)
    for node in inventory.nodes.values():
        node.settings()  # a worker re-validates the stored parameters: they must pass
        # Secret parameters are masked (a secret reference put into a plain parameter,
        # such as power_address, is the operator's choice to show it).
        plain = [v for k, v in node.params.items() if k not in node.secret_fields]
        shown = f"{node!r} {json.dumps(node.public_dict())}"
        for key in node.secret_fields:
            value = node.params[key]
            if value not in (None, ""):
                assert node.public_params()[key] == "***"
                if isinstance(value, str) and len(value) >= 4 and value not in plain:
                    assert value not in shown
    json.dumps(inventory.budgets.to_dict())
    return inventory


def write(path: Path, text: str) -> None:
    """Write generated text as is: a lone surrogate makes the file invalid UTF-8."""
    path.write_bytes(text.encode("utf-8", "surrogatepass"))


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``doc`` (mapping keys and list positions)."""
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out.extend(_paths(value, (*prefix, i)))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


keys = st.one_of(
    st.sampled_from(["name", "rack", "power_type", "power_parameters", "tags", "pdu",
                     "priority", "nodes", "defaults", "budgets", "secrets_file", "env", "file",
                     "max_starts", "window", "power_pass", "power_address", "global", "racks"]),
    odd_text, st.integers(), st.booleans(), st.none(),
)
replacements = st.one_of(
    values,
    secrets,
    st.sampled_from([{"env": "PQ_PASS"}, {"env": "MISSING"}, {"file": "bmc"}, {"file": "nested"},
                     {"file": "nope"}, {"env": 3}, {"env": "PQ_PASS", "file": "bmc"}, {},
                     "ipmi", "redfish", "manual", "webhook", "10s", "0s", "-1s", 10**400,
                     float("inf"), float("nan"), "x" * 10_000, "ノード", "node001", "r12"]),
)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = _parent(doc, path)
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = copy.deepcopy(draw(replacements))
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(keys)] = copy.deepcopy(draw(replacements))
        elif action == "add":
            parent.insert(draw(st.integers(0, len(parent))), copy.deepcopy(draw(replacements)))
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        else:
            parent[draw(keys)] = copy.deepcopy(parent[path[-1]])
    return doc


@given(doc=mutated(), as_json=st.booleans())
def test_mutated_inventories(workdir: Path, doc: dict[str, Any], as_json: bool) -> None:
    path = workdir / "mutated.yaml"
    if as_json:  # JSON is YAML: an inventory written by a program
        write(path, json.dumps(doc, default=str))
    else:
        write(path, yaml.safe_dump(doc, allow_unicode=True))
    _load(path)


@given(doc=st.one_of(values, st.dictionaries(keys, values, max_size=5),
                     st.fixed_dictionaries({"nodes": st.lists(values, max_size=4)})))
def test_generated_documents(workdir: Path, doc: Any) -> None:
    path = workdir / "generated.yaml"
    write(path, yaml.safe_dump(doc, allow_unicode=True))
    _load(path)


@st.composite
def node_entries(draw: st.DrawFn) -> dict[str, Any]:
    """Nodes with names, racks, tags and PDUs that are huge, unicode or odd."""
    name_text = st.one_of(st.text(min_size=1, max_size=8), st.sampled_from(
        ["n" * 100_000, "9" * 5000, "n" + "1" * 5000, "ノード", "a b", "a\x00", "-", ".", "1"]))
    return {
        "name": draw(name_text), "rack": draw(name_text),
        "power_type": draw(st.sampled_from(["manual", "ipmi", "virsh", "nope"])),
        "power_parameters": draw(st.one_of(
            st.just({}), st.just({"power_address": "10.0.0.1", "power_pass": {"env": "PQ_PASS"}}),
            st.dictionaries(odd_text, values, max_size=3))),
        "tags": draw(st.lists(name_text, max_size=3)),
        "pdu": draw(st.one_of(st.none(), name_text)),
        "priority": draw(st.one_of(st.none(), st.integers(), values)),
    }


@given(nodes=st.lists(node_entries(), max_size=5))
def test_odd_names(workdir: Path, nodes: list[dict[str, Any]]) -> None:
    path = workdir / "odd.yaml"
    write(path, yaml.safe_dump({"nodes": nodes}, allow_unicode=True))
    _load(path)


@given(cut=st.integers(0, 4000), junk=st.binary(max_size=12), secrets_junk=st.binary(max_size=40))
def test_damaged_text(workdir: Path, cut: int, junk: bytes, secrets_junk: bytes) -> None:
    """The valid file's bytes truncated and spliced with junk (invalid UTF-8 included);
    a damaged secrets file too."""
    text = yaml.safe_dump(BASE).encode()
    cut = min(cut, len(text))
    path = workdir / "damaged.yaml"
    path.write_bytes(text[:cut] + junk + text[cut + len(junk):])
    secrets_path = workdir / "damaged-secrets.yaml"
    secrets_path.write_bytes(yaml.safe_dump(SECRETS_FILE).encode()[: cut % 60] + secrets_junk)
    _load(path)
    _load(path, secrets_path)


HOSTILE_YAML = [
    "nodes: &a [*a]",
    "nodes:\n  - &n {name: a, rack: r, power_type: manual, tags: *n}",
    "nodes:\n  - name: a\n    rack: r\n    power_type: virsh\n    power_parameters: &p {power_address: *p}",
    "a: &a [x, x]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\nd: &d [*c, *c, *c, *c]\nnodes: [*d, *d]",
    "nodes: " + "[" * 5000 + "]" * 5000,
    "nodes: " + "{a: " * 3000 + "1" + "}" * 3000,
    "nodes: !!python/object/apply:os.system ['true']",
    "nodes: []\nnodes: [1]",
    "nodes:\n\t- name: a",
    "? [a, b]\n: c\nnodes: []",
    "nodes: [{name: a, rack: r, power_type: manual}]\nbudgets: {global: {max_starts: 1, window: 1e999}}",
    "nodes: [{name: a, rack: r, power_type: manual}]\nbudgets: {global: {max_starts: 1, window: "
    + "9" * 400 + "}}",
    "nodes: [{name: a, rack: r, power_type: manual, priority: " + "9" * 5000 + "}]",
    "nodes: [{name: a, rack: r, power_type: manual}]\ndefaults: {manual: {x: 1}, nope: {}, ipmi: []}",
    "nodes: [{name: a, rack: r, power_type: ipmi, power_parameters: {power_address: 1.2.3.4, "
    "power_pass: {file: bmc}}}]\nsecrets_file: [x]",
    "nodes: [{name: a, rack: r, power_type: ipmi, power_parameters: {power_address: 1.2.3.4, "
    "power_pass: !!binary aGVsbG8=}}]",
    "nodes: [{name: a, rack: r, power_type: ipmi, power_parameters: {power_address: 2001-01-01, "
    "power_port: 1e3}}]",
    "\ufeffnodes: []",
    "nodes: []\n...\n---\nnodes: []",
    "%YAML 9.9\n---\nnodes: []",
]


@pytest.mark.parametrize("text", HOSTILE_YAML, ids=range(len(HOSTILE_YAML)))
def test_hostile_yaml(workdir: Path, text: str) -> None:
    """Aliases that recurse or multiply, nesting past the recursion limit, Python tags,
    duplicate or complex keys, tabs, numbers too big for a float or for int()."""
    path = workdir / "hostile.yaml"
    path.write_text(text)
    _load(path)
