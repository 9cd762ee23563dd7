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
