"""The simulated fleet at scale (issue 4): ``powerq sim up`` / ``status`` / ``down``, the
IPMI peer's fleet-wide reply latency, and its answers to FreeIPMI's retransmissions.

Behaviour, not speed: the timing checks are bounds a serialised peer could not meet
(N replies in well under N x latency), never benchmarks. Addresses: IPMI 127.44.x,
Redfish 127.45.x, in-process shards 127.46.x.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers import rmcpsession as rs
from tests.peers import fleet as simfleet
from tests.peers import ipmi_bmc, redfish_sim
from tests.peers.common import PeerControl

ROOT = Path(__file__).resolve().parent.parent
POWERQ = [sys.executable, "-m", "scheduler.cli"]
LATENCY, JITTER = 0.05, 0.01
IPMI_NODES, REDFISH_NODES, RACK_SIZE = 300, 50, 100


def powerq(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*POWERQ, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def need(tool: str) -> str:
    path = shutil.which(tool)
    # `make test` installs freeipmi-tools (deploy/bootstrap.sh): missing is a broken install.
    assert path is not None, f"{tool} is not installed: run `make test`, which installs it"
    return path


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return status.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if not gone(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if not gone(p)]


class Running:
    """A fleet started with ``powerq sim up``, and what it wrote."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state: dict[str, Any] = json.loads((workdir / "fleet.json").read_text())
        self.inventory: dict[str, Any] = yaml.safe_load((workdir / "inventory.yaml").read_text())
        self.secrets: dict[str, str] = yaml.safe_load((workdir / "secrets.yaml").read_text())
        self.nodes = self.inventory["nodes"]

    def of_type(self, power_type: str) -> list[dict[str, Any]]:
        return [n for n in self.nodes if n["power_type"] == power_type]

    def peer_nodes(self) -> dict[str, dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for urls in self.state["controls"].values():
            for url in urls:
                seen.update(PeerControl(url).nodes())
        return seen

    def control_of(self, name: str) -> PeerControl:
        for urls in self.state["controls"].values():
            for url in urls:
                control = PeerControl(url)
                if name in control.nodes():
                    return control
        raise KeyError(name)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("sim-scale")
    out = powerq("sim", "up", "--dir", str(workdir), "--ipmi", str(IPMI_NODES), "--redfish", str(REDFISH_NODES),
                 "--rack-size", str(RACK_SIZE), "--latency", str(LATENCY), "--jitter", str(JITTER),
                 "--ipmi-base", "127.44.0.1", "--redfish-base", "127.45.0.1", "--ipmi-shards", "2")
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "simulated fleet up" in out.stdout and "powerq sim down" in out.stdout
        yield Running(workdir)
    finally:
        powerq("sim", "down", "--dir", str(workdir))


def test_up_writes_racks_inventory_and_private_secrets(running: Running) -> None:
    state = running.state
    assert state["types"] == {"ipmi": IPMI_NODES, "redfish": REDFISH_NODES}
    assert state["rack_sizes"] == {"r1": 100, "r2": 100, "r3": 100, "r4": 50}
    assert len(state["pids"]) == 3  # two IPMI shards, one Redfish simulator
    assert all(not gone(p) for p in [state["pid"], *state["pids"]])
    racks = {n["rack"] for n in running.of_type("ipmi")}
    assert racks == {"r1", "r2", "r3"} and {n["rack"] for n in running.of_type("redfish")} == {"r4"}
    addresses = [n["power_parameters"]["power_address"] for n in running.of_type("ipmi")]
    assert len(set(addresses)) == IPMI_NODES and all(a.startswith("127.44.") for a in addresses)
    # passwords only in the secrets file, both files private to their owner
    inventory_text = (running.workdir / "inventory.yaml").read_text()
    assert running.inventory["secrets_file"] == "secrets.yaml"
    for value in running.secrets.values():
        assert value not in inventory_text
    for name in ("inventory.yaml", "secrets.yaml"):
        assert stat.S_IMODE((running.workdir / name).stat().st_mode) == 0o600
    assert all(n["power_parameters"]["power_pass"] == {"file": f"{n['power_type']}_power_pass"}
               for n in running.nodes)


def test_inventory_loads_with_its_secrets(running: Running) -> None:
    out = powerq("inventory", "load", str(running.workdir / "inventory.yaml"), "--check", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    for value in running.secrets.values():
        assert value not in out.stdout + out.stderr


def test_status_reports_the_running_fleet(running: Running) -> None:
    out = powerq("sim", "status", "--dir", str(running.workdir))
    assert out.returncode == 0, out.stderr
    assert f"{IPMI_NODES + REDFISH_NODES} nodes" in out.stdout and "latency 50 ms" in out.stdout


def test_every_ipmi_address_answers_ipmipower(running: Running, tmp_path: Path) -> None:
    ipmipower = need("ipmipower")
    # the password goes in a config file (mode 0600), not on the command line (ps)
    conf = tmp_path / "freeipmi.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"driver-type LAN_2_0\nusername admin\npassword {running.secrets['ipmi_power_pass']}\n")
    nodes = running.of_type("ipmi")
    by_address = {n["power_parameters"]["power_address"]: n["name"] for n in nodes}
    out = subprocess.run([ipmipower, "--config-file", str(conf), "-h", ",".join(by_address), "--stat",
                          "-F", "1024"], capture_output=True, text=True, timeout=60)
    answers = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert set(answers) == set(by_address), out.stderr
    peers = running.peer_nodes()
    wrong = {a: s for a, s in answers.items() if s != peers[by_address[a]]["power"]}
    assert not wrong, dict(list(wrong.items())[:5])
    assert sum(1 for s in answers.values() if s == "on") == IPMI_NODES // 3  # --initial mixed


def test_every_redfish_address_answers_http(running: Running) -> None:
    auth = "Basic " + base64.b64encode(f"admin:{running.secrets['redfish_power_pass']}".encode()).decode()
    peers = running.peer_nodes()

    def get(node: dict[str, Any]) -> tuple[int, str]:
        url = (node["power_parameters"]["power_address"] + "/redfish/v1/Systems/"
               + redfish_sim.system_uuid(node["name"]))
        req = urllib.request.Request(url, headers={"Authorization": auth})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())["PowerState"]

    nodes = running.of_type("redfish")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(get, nodes))
    assert all(code == 200 for code, _ in answers)
    assert [state.lower() for _, state in answers] == [peers[n["name"]]["power"] for n in nodes]


def _asf_ping(tag: int) -> bytes:
    # RMCP / ASF presence ping: the IPMI peer answers it with a pong, through its timer heap
    return b"\x06\x00\xff\x06" + b"\x00\x00\x11\xbe" + bytes([0x80, tag, 0, 0])


def _ping_all(addresses: list[str], timeout: float = 5.0) -> dict[str, float]:
    """Send one presence ping to each address at once; seconds until each pong."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    sent: dict[str, float] = {}
    took: dict[str, float] = {}
    try:
        for i, address in enumerate(addresses):
            sent[address] = time.monotonic()
            sock.sendto(_asf_ping(i & 0xFF), (address, 623))
        deadline = time.monotonic() + timeout
        while len(took) < len(addresses) and time.monotonic() < deadline:
            try:
                data, (address, _port) = sock.recvfrom(512)
            except TimeoutError:
                continue
            if data[8:9] == b"\x40" and address in sent:
                took.setdefault(address, time.monotonic() - sent[address])
    finally:
        sock.close()
    return took


def test_ipmi_latency_is_applied_without_serialising(running: Running) -> None:
    addresses = [n["power_parameters"]["power_address"] for n in running.of_type("ipmi")][:200]
    began = time.monotonic()
    took = _ping_all(addresses)
    elapsed = time.monotonic() - began
    assert len(took) == len(addresses)
    assert min(took.values()) >= LATENCY - JITTER  # every reply waited
    assert max(took.values()) <= LATENCY + JITTER + 1.0
    assert elapsed < len(addresses) * LATENCY / 4  # 200 replies in about one latency, not 200


def test_a_slow_bmc_does_not_hold_up_the_others(running: Running) -> None:
    nodes = running.of_type("ipmi")[:20]
    slow, others = nodes[0], nodes[1:]
    control = running.control_of(slow["name"])
    control.fault(slow["name"], "slow", 1.5)
    try:
        took = _ping_all([n["power_parameters"]["power_address"] for n in nodes])
    finally:
        control.fault(slow["name"], "none")
    assert took[slow["power_parameters"]["power_address"]] >= 1.5
    assert max(took[n["power_parameters"]["power_address"]] for n in others) < 1.0


def test_redfish_latency_is_applied_without_serialising(running: Running) -> None:
    nodes = running.of_type("redfish")

    def root(node: dict[str, Any]) -> float:
        began = time.monotonic()
        with urllib.request.urlopen(node["power_parameters"]["power_address"] + "/redfish/v1/", timeout=30) as r:
            assert r.status == 200
        return time.monotonic() - began

    began = time.monotonic()
    with ThreadPoolExecutor(len(nodes)) as pool:
        took = list(pool.map(root, nodes))
    elapsed = time.monotonic() - began
    assert min(took) >= LATENCY - JITTER
    assert elapsed < len(nodes) * LATENCY / 4


def test_up_refuses_a_second_fleet_in_the_same_dir(running: Running) -> None:
    out = powerq("sim", "up", "--dir", str(running.workdir), "--ipmi", "3", "--ipmi-base", "127.44.100.1")
    assert out.returncode == 2 and "already runs" in out.stderr


def test_down_stops_every_process(tmp_path: Path) -> None:
    out = powerq("sim", "up", "--dir", str(tmp_path), "--ipmi", "20", "--redfish", "3", "--rack-size", "10",
                 "--ipmi-base", "127.44.120.1", "--redfish-base", "127.45.120.1", "--latency", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads((tmp_path / "fleet.json").read_text())
    pids = [state["pid"], *state["pids"]]
    assert state["rack_sizes"] == {"r1": 10, "r2": 10, "r3": 3}
    out = powerq("sim", "down", "--dir", str(tmp_path))
    assert out.returncode == 0 and "stopped" in out.stdout, out.stdout + out.stderr
    assert wait_gone(pids) == []
    assert not (tmp_path / "fleet.json").exists()
    again = powerq("sim", "down", "--dir", str(tmp_path))
    assert again.returncode == 0 and "no simulated fleet" in again.stdout
    status = powerq("sim", "status", "--dir", str(tmp_path))
    assert status.returncode == 1


def test_down_cleans_up_after_a_killed_runner(tmp_path: Path) -> None:
    out = powerq("sim", "up", "--dir", str(tmp_path), "--ipmi", "5", "--redfish", "2",
                 "--ipmi-base", "127.44.130.1", "--redfish-base", "127.45.130.1", "--latency", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads((tmp_path / "fleet.json").read_text())
    os.kill(state["pid"], signal.SIGKILL)
    assert wait_gone([state["pid"]]) == []
    out = powerq("sim", "down", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_gone(state["pids"]) == []  # the peers go too (on their own or stopped by down)
    assert not (tmp_path / "fleet.json").exists()


def test_foreground_runs_until_stopped(tmp_path: Path) -> None:
    proc = subprocess.Popen([*POWERQ, "sim", "up", "--foreground", "--dir", str(tmp_path), "--ipmi", "4",
                             "--ipmi-base", "127.44.140.1", "--latency", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "fleet.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        state = json.loads((tmp_path / "fleet.json").read_text())
        assert state["pid"] == proc.pid and (tmp_path / "inventory.yaml").exists()
        status = powerq("sim", "status", "--dir", str(tmp_path))
        assert status.returncode == 0 and "4 nodes" in status.stdout, status.stdout + status.stderr
        down = powerq("sim", "down", "--dir", str(tmp_path))  # a SIGTERM, as `make demo-stop` sends
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        assert proc.wait(30) == 0
        assert wait_gone(state["pids"]) == []
        assert not (tmp_path / "fleet.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, message", [
    (["--ipmi", "10", "--racks", "2"], "either --racks/--mix or --ipmi"),
    (["--ipmi", "0"], "at least one node"),
    (["--ipmi", "100", "--ipmi-base", "127.255.255.200"], "ran out of loopback addresses"),
    (["--mix", "ipmi=x"], "bad mix"),
])
def test_up_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    out = powerq("sim", "up", "--dir", str(tmp_path), *args)
    assert out.returncode == 2 and message in out.stdout + out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "fleet.json").exists()


# -- FreeIPMI's retransmissions, in-process ------------------------------------------------------


@pytest.fixture()
def shard() -> Iterator[ipmi_bmc.Shard]:
    nodes = ipmi_bmc.make_nodes(1, "r1", first_address="127.46.0.1", user="admin", password="pw-secret-1")
    made = ipmi_bmc.Shard(nodes, latency=0.0)
    try:
        yield made
    finally:
        made.close()


class Client:
    """One RMCP+ login driven packet by packet against a shard (no threads)."""

    def __init__(self, shard: ipmi_bmc.Shard) -> None:
        self.shard = shard
        self.bmc = next(iter(shard.bmcs.values()))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2)

    def exchange(self, packet: bytes) -> bytes:
        self.sock.sendto(packet, (self.bmc.address, 623))
        self.shard._drain(self.bmc)
        return self.sock.recv(4096)

    def command(self, session: rs.SessionCrypto, seq: int, netfn: int, cmd: int,
                data: bytes = b"") -> tuple[int, int, int, int, bytes]:
        reply = session.open(self.exchange(session.seal(seq, rs.ipmi_request(netfn, cmd, seq, data))))
        assert reply is not None
        answer = rs.ipmi_response(reply)
        assert answer is not None and answer[1] == seq & 0x3F
        return answer

    def close(self) -> None:
        self.sock.close()


def test_freeipmi_retransmissions_are_answered(shard: ipmi_bmc.Shard) -> None:
    """FreeIPMI resends RAKP 1, RAKP 3 and Close Session under a new message tag or new
    sequence numbers when the reply is late; each must be answered (else the client
    waits out its session timeout)."""
    suite = rs.SUITES[3]
    client = Client(shard)
    try:
        console = os.urandom(4)
        reply = client.exchange(rs.handshake_packet(rs.PT_OPEN_REQUEST, rs.open_session_request(1, 4, console, suite)))
        opened = rs.parse_open_session_response(rs.handshake_payload(reply)[1])  # type: ignore[index]
        assert opened is not None and opened.status == 0
        login = rs.Login(suite, console, opened.bmc_sid, b"admin", b"pw-secret-1", None, 4)
        first = rs.handshake_payload(client.exchange(rs.handshake_packet(rs.PT_RAKP1, login.rakp1(2))))
        again = rs.handshake_payload(client.exchange(rs.handshake_packet(rs.PT_RAKP1, login.rakp1(3))))
        assert first is not None and again is not None
        assert again[1][0] == 3 and again[1][1:] == first[1][1:]  # same random number, new tag
        assert login.check_rakp2(again[1]) == 0
        rakp4 = client.exchange(rs.handshake_packet(rs.PT_RAKP3, login.rakp3(4)))
        resent = client.exchange(rs.handshake_packet(rs.PT_RAKP3, login.rakp3(5)))
        for packet, tag in ((rakp4, 4), (resent, 5)):
            assert packet[5] == rs.PT_RAKP4  # neither encrypted nor authenticated
            assert packet[6:14] == bytes(8)  # session id 0, sequence 0, as a setup packet
            payload = rs.handshake_payload(packet)
            assert payload is not None and payload[1][0] == tag
            assert login.check_rakp4(payload[1]) == 0
        session = login.session()
        assert client.command(session, 1, 0, 1)[3] == 0  # Get Chassis Status
        counts = client.bmc.counts
        assert (counts["sessions"], counts["established"], counts["retransmits"]) == (1, 1, 2)
        # Close Session, then the same close resent under new sequence numbers (FreeIPMI's
        # retransmission when our reply was late): answered again, not left to time out.
        assert client.command(session, 2, 6, 0x3C, opened.bmc_sid)[3] == 0
        assert client.bmc.open_sessions() == 0
        assert client.command(session, 3, 6, 0x3C, opened.bmc_sid)[3] == 0
        assert client.bmc.counts["retransmits"] == 3
        # anything else on the closed session gets no answer
        client.sock.sendto(session.seal(4, rs.ipmi_request(0, 1, 4)), (client.bmc.address, 623))
        client.shard._drain(client.bmc)
        client.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.sock.recv(4096)
        assert client.bmc.counts["query"] == 1
    finally:
        client.close()


def test_shard_reply_delay_is_latency_with_jitter_plus_slow_fault() -> None:
    nodes = ipmi_bmc.make_nodes(2, "r1", first_address="127.46.0.10", user="admin", password="pw-secret-1")
    made = ipmi_bmc.Shard(nodes, latency=0.05, jitter=0.02, seed=7)
    try:
        fast, slow = made.bmcs.values()
        delays = [made.reply_delay(fast) for _ in range(2000)]
        assert 0.03 <= min(delays) < 0.035 and 0.065 < max(delays) <= 0.07
        slow.fault, slow.latency = "slow", 1.0
        assert 1.03 <= made.reply_delay(slow) <= 1.07
    finally:
        made.close()
    with pytest.raises(ValueError):
        ipmi_bmc.Shard([], latency=-1)


def test_layout_racks_and_addresses() -> None:
    nodes = simfleet.plan_layout(simfleet.Layout(ipmi=600, redfish=30, rack_size=250, ipmi_base="127.44.200.1",
                                                 redfish_base="127.45.200.1"), initial="off")
    ipmi, redfish = nodes["ipmi"], nodes["redfish"]
    assert [sum(1 for n in ipmi if n.rack == r) for r in ("r1", "r2", "r3")] == [250, 250, 100]
    assert {n.rack for n in redfish} == {"r4"}
    addresses = [str(n.power_parameters["power_address"]) for n in ipmi]
    assert len(set(addresses)) == 600 and not any(a.endswith((".0", ".255")) for a in addresses)
    assert simfleet.Layout(ipmi=5000).shards_for_ipmi() == 3
    assert simfleet.Layout(ipmi=300).shards_for_ipmi() == 1
