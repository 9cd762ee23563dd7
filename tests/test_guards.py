"""The guards that keep the code's walls standing (issue #24, step 6): ruff's chosen rules
(pyproject.toml) and the import contracts (.importlinter), run as tests so that `pytest`, and so CI,
fails when one breaks."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(REPO)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory) -> Path:
    """A folder with hl7relay installed as a whole, for import-linter and mypy: an editable
    install maps ack/ and transformers/ from beside engine/, where they do not look."""
    # always a folder of its own, even when the package is installed (CI): mypy refuses a
    # site-packages folder on its path, and import-linter reads only what the folder holds.
    # From a copy of the sources: a build/ folder left in the checkout by an earlier install
    # would bring back modules since moved or deleted
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "engine", "ack", "transformers"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    target = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    return target


def test_the_import_contracts_are_kept(installed_package, tmp_path):
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint_imports, "import-linter is not installed (pip install '.[test]')"
    env = dict(os.environ, PYTHONPATH=str(installed_package))
    result = subprocess.run([lint_imports, "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-3000:] + result.stderr


# the modules mypy does not count yet (pyproject.toml): the list may only shrink
MYPY_UNCHECKED_AT_MOST = 44


def test_mypy_finds_nothing(installed_package, tmp_path):
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    unchecked = [module for override in config.get("overrides", []) if override.get("ignore_errors")
                 for module in override["module"]]
    assert len(unchecked) <= MYPY_UNCHECKED_AT_MOST, "a module joined mypy's unchecked list: type it instead"
    for seam in ("runtime", "trip", "queues", "receiving", "resources", "controls", "mllp.listener", "ack.policy"):
        assert f"hl7relay.{seam}" not in unchecked
    env = dict(os.environ, MYPYPATH=str(installed_package))
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                             "--cache-dir", str(tmp_path / "cache"), "-p", "hl7relay"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
