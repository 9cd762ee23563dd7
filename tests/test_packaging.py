"""The repository's folders install under the one import name hl7relay."""

import configparser
import importlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setup_cfg():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


def _package_dirs(config) -> dict[str, str]:
    lines = [line.strip() for line in config["options"]["package_dir"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_every_package_folder_is_listed_in_setup_cfg():
    config = _setup_cfg()
    listed = {p.strip() for p in config["options"]["packages"].splitlines() if p.strip()}
    mapping = _package_dirs(config)
    expected = set()
    for package, folder in mapping.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root).parts
            if "__pycache__" in relative:
                continue
            expected.add(".".join((package,) + relative))
    missing = expected - listed
    assert not missing, f"package folders missing from setup.cfg [options] packages: {sorted(missing)}"
    stale = listed - expected
    assert not stale, f"setup.cfg lists packages with no folder: {sorted(stale)}"


def test_required_layout_and_single_import_name():
    for folder in ("channels", "engine", "transformers", "ack", "config", "samples", "tests"):
        assert (REPO / folder).is_dir(), folder
    assert _package_dirs(_setup_cfg()) == {
        "hl7relay": "engine", "hl7relay.ack": "ack", "hl7relay.transformers": "transformers",
    }
    for name in ("hl7relay", "hl7relay.ack", "hl7relay.transformers", "hl7relay.cli", "hl7relay.validation"):
        importlib.import_module(name)


def test_no_root_conftest_and_importlib_mode():
    assert not (REPO / "conftest.py").exists()
    assert "--import-mode=importlib" in _setup_cfg()["tool:pytest"]["addopts"]


def test_console_script_and_module_entry_point():
    scripts = _setup_cfg()["options.entry_points"]["console_scripts"]
    assert "hl7relay = hl7relay.cli:main" in scripts
    assert importlib.util.find_spec("hl7relay.__main__") is not None
