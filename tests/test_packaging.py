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


def test_the_readme_shows_the_shipped_channel_as_it_is_and_names_every_port():
    """The README showed a channel that was not the shipped file and never named the ORU
    destination's port."""
    readme = (REPO / "README.md").read_text()
    shipped = (REPO / "channels" / "adt-to-lab.yaml").read_text()
    assert "```yaml\n" + shipped + "```" in readme
    for port, variable in (("2575", "ADT_PORT"), ("2576", "LAB_PORT"), ("2577", "SIU_PORT"), ("2578", "ORU_PORT"),
                           ("2580", "PMS_PORT")):
        assert f"| {port} |" in readme and f"`{variable}`" in readme
        assert variable in "".join(p.read_text() for p in (REPO / "channels").glob("*.yaml"))
    lines = readme.splitlines()
    assert lines.index("## Contents") < lines.index("## Quick start") < 40


def test_the_systemd_unit_gives_a_clean_stop_its_time():
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(REPO / "config" / "hl7relay.service")
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) > 10 + 5  # stop_timeout (10 s) and the store's flush
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].split()[1:3] == ["run", "--config"]
    assert "Running as a service" in (REPO / "README.md").read_text()
