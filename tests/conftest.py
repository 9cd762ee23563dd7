"""Shared fixtures: where the samples and the shared corpus are."""

from pathlib import Path

import pytest
from twisted.internet import defer

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        pytest.skip("../shared/corpus is not beside this checkout")
    return CORPUS


class ManualExecutor:
    """Stands in for the store's writer thread: calls run only when the test says so."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, *args):
        d = defer.Deferred()
        self.calls.append((fn, args, d))
        return d

    def run(self, index=0):
        fn, args, d = self.calls.pop(index)
        try:
            d.callback(fn(*args))
        except Exception as exc:  # noqa: BLE001 - delivered as the thread would
            d.errback(exc)

    def run_all(self):
        while self.calls:
            self.run(0)


@pytest.fixture
def manual_executor():
    return ManualExecutor()


# An ADT channel whose one destination nobody answers (port 9, discard): deliveries stay queued.
ADT_CHANNEL = ("name: adt\nsource: {type: mllp, port: 0}\n"
               "destinations: [{name: lab, type: mllp, host: 127.0.0.1, port: 9, retry_initial: 30, retry_max: 30}]\n")


class RunningEngine:
    """A real ``hl7relay run`` in ``folder`` (one ADT channel, a store made beforehand so that
    users and tokens can be added before it starts), on free ports."""

    def __init__(self, folder: Path, *arguments, prepare=None, channel: str = ADT_CHANNEL):
        import os
        import re
        import subprocess
        import sys

        from hl7relay.store.database import Store

        (folder / "channels").mkdir()
        (folder / "channels" / "adt.yaml").write_text(channel)
        self.folder = folder
        self.store = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")
        self.store.migrate()
        if prepare is not None:
            prepare(self.store)  # users, tokens
        self.process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", *arguments], cwd=folder,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        sys.path.insert(0, str(Path(__file__).parent))
        from test_runtime import READY, wait_for_line

        try:
            self.startup = "".join(wait_for_line(self.process, READY))
        except BaseException:  # it did not start: do not leave it behind
            self.process.kill()
            self.process.wait(timeout=30)
            self.process.stdout.close()
            raise
        self.mllp_port = int(self.startup.split("MLLP on 127.0.0.1:")[1].split()[0])
        console = re.search(r"console: (https?://[^/\s]+)/", self.startup)
        self.console = console.group(1) if console else None

    def stop(self) -> int:
        import signal

        self.process.send_signal(signal.SIGTERM)
        rest, _ = self.process.communicate(timeout=30)  # its log, for the suite's secret scan
        (self.folder / "engine.log").write_bytes(self.startup.encode() + (rest or b""))
        return self.process.returncode


@pytest.fixture(scope="session")
def running_engine():
    """``running_engine(folder, *arguments, prepare=fn)``: a :class:`RunningEngine`."""
    return RunningEngine


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A migrated store on SQLite, then on the PostgreSQL of test_store.py (an emptied schema)."""
    from hl7relay.store.database import Store
    from test_store import _postgres_store

    store = Store(f"sqlite:///{tmp_path / 'store.db'}") if request.param == "sqlite" else _postgres_store()
    store.migrate()
    yield store
    store.close()


@pytest.fixture
def unit_engine(tmp_path, manual_executor):
    """An Engine on a task.Clock with one ADT channel (a file destination) and a SQLite store whose
    work runs when the test says (``manual_executor.run_all()``): (engine, channel, store, clock)."""
    from twisted.internet import task

    from hl7relay.channels import load_channel
    from hl7relay.runtime import Engine
    from hl7relay.store.database import Store
    from hl7relay.store.writer import StoreWriter

    path = tmp_path / "adt.yaml"
    path.write_text("name: adt\nsource: {type: mllp, port: 0}\ndestinations: [{name: lab, type: file, directory: out}]\n")
    channel, errors = load_channel(path, {})
    assert not errors, errors
    store = Store(f"sqlite:///{tmp_path / 'unit.db'}")
    store.migrate()
    clock = task.Clock()
    return Engine([channel], StoreWriter(store, clock, executor=manual_executor), reactor=clock), channel, store, clock


@pytest.fixture
def server_certificate(tmp_path):
    """A test CA and a server certificate for 127.0.0.1 it issued, as PEM files:
    (ca.pem, server.pem, server.key)."""
    files = issue_pki(tmp_path)
    return Path(files["ca"]), Path(files["server"]), Path(files["server_key"])


def issue_pki(folder: Path, server_days: float = 1.0) -> dict:
    """A test CA, a server certificate for localhost/127.0.0.1 valid ``server_days`` and a client
    certificate, as PEM files in ``folder``: {"ca", "server", "server_key", "client", "client_key"}."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def issue(subject, key, issuer, issuer_key, *, ca=False, server=False, days=1.0):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    files = {}

    def write(label, cert, key=None):
        (folder / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[label] = str(folder / f"{label}.pem")
        if key is not None:
            (folder / f"{label}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            files[label + "_key"] = str(folder / f"{label}.key")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", issue("hl7relay test CA", ca_key, "hl7relay test CA", ca_key, ca=True, days=30))
    for label, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(label, issue(f"hl7relay {label}", key, "hl7relay test CA", ca_key, server=server,
                           days=server_days if server else 1.0), key)
    return files


@pytest.fixture(scope="session")
def make_pki(tmp_path_factory):
    """make_pki(server_days=1.0) -> the files of :func:`issue_pki`, in a folder of their own."""
    return lambda server_days=1.0: issue_pki(tmp_path_factory.mktemp("pki"), server_days)


def pytest_sessionstart(session):
    import secret_scan  # by name (pythonpath = tests): the one module the tests' helpers record into

    secret_scan.ROOT[0] = session.config._tmp_path_factory.getbasetemp()


def pytest_sessionfinish(session, exitstatus):
    """No secret a test set is in a snapshot, an audit entry, a log or an answer of the suite."""
    import secret_scan

    hits = secret_scan.scan(secret_scan.ROOT[0]) if secret_scan.ROOT[0] is not None else []
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if hits:
        for hit in hits[:50]:
            if reporter is not None:
                reporter.write_line(f"SECRET LEAK: {hit}", red=True)
        session.exitstatus = 1
    elif reporter is not None:
        reporter.write_line("secret scan: no secret of the suite's in its snapshots, audit entries, logs or answers")
