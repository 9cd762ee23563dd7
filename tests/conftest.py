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
        from test_runtime import wait_for_line

        try:
            self.startup = "".join(wait_for_line(self.process, "ready"))
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
        code = self.process.wait(timeout=30)
        self.process.stdout.close()
        return code


@pytest.fixture(scope="session")
def running_engine():
    """``running_engine(folder, *arguments, prepare=fn)``: a :class:`RunningEngine`."""
    return RunningEngine
