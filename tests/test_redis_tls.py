"""Redis with a password and over TLS (``rediss://``), from configuration: a redis-server of
the test's own, certificates made here, and a real job through a real worker over it.
The password never shows in logs, ``powerq config``, errors or the broker URL Flower shows."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scheduler.config import Config
from scheduler.store import Store
from tests.conftest import ROOT, RedisServer
from tests.fullpath import FullPath
from tests.peers import ipmi_bmc
from tests.peers.common import SimNode

pytestmark = pytest.mark.integration

PASSWORD = "rds-Pa55-w0rd-7f3k"


# -- certificates -------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, cn: str, usage: x509.ObjectIdentifier,
           ip: str | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    d = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (x509.CertificateBuilder().subject_name(_name("powerq test CA"))
               .issuer_name(_name("powerq test CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    ca, _ = _write(d / "ca", ca_key, ca_cert)
    server, server_key = _write(d / "server", *_issue(ca_key, ca_cert.subject, "127.0.0.1",
                                                      ExtendedKeyUsageOID.SERVER_AUTH, "127.0.0.1"))
    client, client_key = _write(d / "client", *_issue(ca_key, ca_cert.subject, "powerq",
                                                      ExtendedKeyUsageOID.CLIENT_AUTH))
    return {"ca": ca, "server": server, "server_key": server_key, "client": client,
            "client_key": client_key}


def _tls_args(certs: dict[str, str]) -> list[str]:
    return ["--port", "0", "--tls-port", "{port}", "--tls-cert-file", certs["server"],
            "--tls-key-file", certs["server_key"], "--tls-ca-cert-file", certs["ca"],
            "--tls-auth-clients", "yes", "--requirepass", PASSWORD]


# -- a password over plain TCP --------------------------------------------------------------------
def test_password_in_the_url_works_and_is_masked(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, redis_args=["--requirepass", PASSWORD])
    server.start()
    try:
        config = Config(redis_url=f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0", key_prefix="pw")
        store = Store.from_config(config)
        store.client.set("pw:probe", "1")
        assert store.client.get("pw:probe") == "1"
        assert PASSWORD not in json.dumps(config.describe())
        wrong = Store.from_config(Config(redis_url=f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0",
                                         redis_retry_for=0.5))
        with pytest.raises(redis.AuthenticationError) as info:
            wrong.client.ping()
        assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value)
        assert PASSWORD not in repr(store.client) and PASSWORD not in repr(store)
    finally:
        server.stop()


def test_broker_ssl_options_and_the_url_flower_shows(certs: dict[str, str]) -> None:
    import ssl

    from workers.app import make_app

    config = Config(redis_url=f"rediss://:{PASSWORD}@127.0.0.1:6390/0", redis_ssl_ca_certs=certs["ca"])
    app = make_app(config)
    assert app.conf.broker_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert app.conf.broker_use_ssl["ssl_ca_certs"] == certs["ca"]
    assert PASSWORD not in app.connection().as_uri()  # what Flower and Celery's banner show
    plain = make_app(Config(redis_url="redis://127.0.0.1:6390/0"))
    assert not plain.conf.broker_use_ssl


# -- TLS with a client certificate and a password, through a real worker -------------------------
@pytest.fixture(scope="module")
def ipmi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ipmi_bmc.IpmiFleet, list[SimNode]]]:
    nodes = ipmi_bmc.make_nodes(2, "fp", first_address="127.35.0.21", prefix="tlsipmi",
                                password="tls-ipmi-Pa55")
    fleet = ipmi_bmc.start_fleet(nodes, Path(tmp_path_factory.mktemp("tls-ipmi")))
    yield fleet, nodes
    fleet.stop()


def test_a_job_over_tls_with_a_password(
    tmp_path: Path, certs: dict[str, str], ipmi: tuple[ipmi_bmc.IpmiFleet, list[SimNode]]
) -> None:
    fleet, nodes = ipmi
    flower_password = "flwr-Pa55-9q2z"
    fp = FullPath(tmp_path, redis_args=_tls_args(certs), POWERQ_REDIS_SSL_CA_CERTS=certs["ca"],
                  POWERQ_REDIS_SSL_CERTFILE=certs["client"], POWERQ_REDIS_SSL_KEYFILE=certs["client_key"],
                  POWERQ_FLOWER_BASIC_AUTH=f"ops:{flower_password}")
    url = f"rediss://:{PASSWORD}@127.0.0.1:{fp.redis.port}/0"
    fp.extra_env["POWERQ_REDIS_URL"] = url
    try:
        fp.start()
        fp.load(n.inventory_entry() for n in nodes)
        names = ",".join(n.name for n in nodes)
        for name in (n.name for n in nodes):
            fleet.set_state(name, "off")
        job = fp.run("on", names)
        assert job["returncode"] == 0 and all(r["outcome"] == "ok" for r in job["by_node"].values()), job
        assert all(fleet.nodes()[n.name]["power"] == "on" for n in nodes)
        job = fp.run("query", names)
        assert all(r["state_after"] == "on" for r in job["by_node"].values()), job

        # Plain TCP is refused: the server speaks TLS only.
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=fp.redis.port, password=PASSWORD, socket_timeout=2).ping()

        config = fp.pq("config")
        assert config.returncode == 0 and "rediss://:***@127.0.0.1" in config.stdout
        # Without the CA the server's certificate is refused; with a wrong password too:
        # a clear error each time, and never the password.
        errors = []
        for override in ({"POWERQ_REDIS_SSL_CA_CERTS": ""},
                         {"POWERQ_REDIS_URL": url.replace(PASSWORD, "wrong-" + PASSWORD)}):
            env = dict(fp.env, POWERQ_REDIS_RETRY_FOR="1", **override)
            out = subprocess.run([sys.executable, "-m", "scheduler.cli", "status", "--json"], env=env,
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert out.returncode != 0, out.stdout
            errors.append(out.stdout + out.stderr)
        # What a worker tells anyone who may inspect it (Flower's /api/workers asks for
        # conf, stats and report): the Redis password, the Fernet key and Flower's own
        # password were in `inspect conf` through powerq's Config until it masked them.
        from workers.app import make_app

        app = make_app(Config.from_env(fp.env))
        inspect = app.control.inspect(timeout=5)
        answers = [inspect.conf(), inspect.conf(with_defaults=True), inspect.report(), inspect.stats()]
        assert all(answers) and "powerq_config" in json.dumps(answers[0])
        seen = "".join([config.stdout, config.stderr, *errors, fp.worker_log(), json.dumps(job),
                        json.dumps(answers, default=str)])
        for secret in (PASSWORD, "tls-ipmi-Pa55", fp.secret_key, flower_password):
            assert secret not in seen
    finally:
        fp.stop()
