"""Every verb with ordinary mistakes: one clear line, a non-zero exit, never a traceback."""

import socket
import subprocess
import sys

import json
from pathlib import Path

import pytest

from hl7relay.cli import main
from hl7relay.store.database import Store


def run(capsys, argv):
    if argv[0] == "run":  # it starts logging and a reactor: a process of its own
        result = subprocess.run([sys.executable, "-m", "hl7relay", *argv], capture_output=True, text=True, timeout=60)
        return result.returncode, result.stdout + result.stderr
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse, and verbs that exit with a message
        code = exc.code if isinstance(exc.code, int) else (print(exc.code, file=sys.stderr) or 1)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HL7RELAY_CONFIG", raising=False)
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "ok.yaml").write_text("name: ok\nsource: {type: mllp, port: 0}\n")
    return tmp_path


def with_store(folder):
    Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}").migrate()


MISTAKES = [
    # (argv, text the answer contains, needs a store)
    (["listen", "--port", "99999"], "out of range", False),
    (["listen", "--port", "http"], "not a port number", False),
    (["send", "--port", "-1", "x.hl7"], "out of range", False),
    (["send", "--timeout", "soon", "x.hl7"], "not a number of seconds", False),
    (["run", "--admin-port", "70000"], "give a port from 1 to 65535, 0 for off, or auto", False),
    (["run", "--console-port", "web"], "give a port from 1 to 65535, 0 for off, or auto", False),
    (["run", "--stop-timeout", "-3"], "0 or more", False),
    (["run", "--store", "nosuch://x"], "not a store URL", False),
    (["run", "--store", "sqlite:////etc/passwd/x.db"], "cannot open the store", False),
    (["run", "--data-dir", "/etc/passwd/sub"], "cannot open the store", False),
    (["run", "--log-level", "loud"], "invalid choice", False),
    (["status"], "no store at", False),
    (["messages", "list"], "no store at", False),
    (["messages", "search", "--text", "DOE"], "no store at", False),
    (["replay", "1", "--dry-run"], "no store at", False),
    (["prune", "--older-than", "30d"], "no store at", False),
    (["status", "--store", "postgresql+psycopg://nobody@127.0.0.1:1/none"], "cannot open the store", False),
    (["messages", "list", "--since", "30"], "not a time", True),
    (["messages", "list", "--since", "yesterday"], "not a time", True),
    (["messages", "list", "--until", "2024-13-45"], "not a time", True),
    (["messages", "show", "abc"], "not a message or entry number", True),
    (["messages", "show", "99999999999999999999999"], "not a message or entry number", True),
    (["messages", "list", "--before", "0"], "not a message or entry number", True),
    (["audit", "--before", "99999999999999999999999"], "not a message or entry number", True),
    (["replay", "99999999999999999999999", "--dry-run"], "not a message or entry number", True),
    (["messages", "show", "99"], "no message 99", True),
    (["prune", "--older-than", "30"], "not an age", True),
    (["prune", "--older-than", "0d"], "add --yes", True),
    (["replay", "42", "--dry-run"], "42", True),
    (["validate", "/nonexistent/file.hl7"], "nonexistent", False),
    (["lint", "/nonexistent/dir"], "nonexistent", False),
    (["test", "/nonexistent/x.test.yaml"], "nonexistent", False),
    (["status", "--config", "missing.yaml"], "no such config file", False),
    (["channel", "disable", "adt"], "no running engine found", False),
    (["destination", "pause", "adt", "lab"], "no running engine found", False),
    (["reload"], "no running engine found", False),
    (["user", "add", "bob", "--role", "root"], "invalid choice", False),
    (["audit", "--since", "soon"], "not a time", True),
    (["trace", "--kind", "fax"], "invalid choice: 'fax'", False),
    (["check", "--credentials"], "expected one argument", False),
    (["token", "create", "pms", "--role", "god"], "invalid choice: 'god'", False),
    (["listen", "--http", "--status", "99"], "not an HTTP status", False),
    (["simulate", "--url", "ftp://x"], "is not an http(s) URL", False),
    (["simulate", "--token-file", "t", "--port", "2575"], "--token-file goes with --url", False),
    (["config", "rollback", "3", "--reason", "x"], "no running engine found", False),
    (["config", "show", "7"], "no snapshot 7", True),
    (["config", "diff", "abc"], "invalid int value", False),
    (["promote", "--from", "test", "--reason", "x"], "name two environments", True),
    (["promote", "--from", "test", "--to", "prod", "--reason", "x"], "no environment 'test'", True),
    (["promote", "--approve", "5", "--reason", "x"], "no promotion 5", True),
    (["promote", "--from", "test", "--to", "prod"], "--reason", False),
    (["replay", "1", "--as-processed", "--dry-run"], "no message 1", True),
    (["reload", "--cluster"], "no store at", False),
    (["reload", "--cluster"], "no running node on this store", True),
    (["reload", "--cluster", "--wait", "soon"], "invalid float value", False),
]


ARGUMENT_MISTAKES = [["send", "--port", "abc"], ["trace", "--kind", "fax"], ["secret", "set"], ["nosuchverb"],
                     ["check", "--timeout", "soon"], ["listen", "--http", "--status", "99"], ["config", "rollback"],
                     ["promote", "--approve", "x"]]


@pytest.mark.parametrize("argv", ARGUMENT_MISTAKES, ids=[" ".join(a) for a in ARGUMENT_MISTAKES])
def test_a_wrong_argument_is_one_line_saying_where_to_read_more(capsys, folder, argv):
    code, output = run(capsys, argv)
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert output.startswith("hl7relay") and output.rstrip().endswith("--help)") and "usage:" not in output


@pytest.mark.parametrize("argv, expected, store", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_an_ordinary_mistake_gets_a_clear_line_not_a_traceback(capsys, folder, argv, expected, store):
    if store:
        with_store(folder)
    code, output = run(capsys, argv)
    assert code not in (0, None), output
    assert "Traceback" not in output and "internal error" not in output, output
    assert expected in output, output
    if not store:
        assert not (folder / "data").exists() or argv[0] == "run"  # a support verb never creates a store


def test_a_bad_config_value_is_a_position_not_a_traceback(capsys, folder):
    (folder / "bad.yaml").write_text("log_level: loud\nlog_phi_bytes: lots\nadmin: {port: 99999}\nstop_timeout: -1\n")
    code, output = run(capsys, ["run", "--config", "bad.yaml"])
    assert code == 1 and "Traceback" not in output
    for fragment in ("bad.yaml:1:12: log_level must be one of", "bad.yaml:2:16: log_phi_bytes must be",
                     "bad.yaml:3:15: admin port must be", "bad.yaml:4:15: stop_timeout must be"):
        assert fragment in output, output


def test_hl7relay_config_names_the_store_for_support_verbs(capsys, folder, monkeypatch):
    (folder / "elsewhere").mkdir()
    Store(f"sqlite:///{folder / 'elsewhere' / 'store.db'}").migrate()
    (folder / "engine.yaml").write_text(f"store: {{url: 'sqlite:///{folder / 'elsewhere' / 'store.db'}'}}\n")
    monkeypatch.setenv("HL7RELAY_CONFIG", str(folder / "engine.yaml"))
    monkeypatch.chdir(folder / "elsewhere")
    code, output = run(capsys, ["status"])
    assert code == 0 and "no store" not in output, output


def test_listen_next_to_a_running_listener_says_the_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "hl7relay", "listen", "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "in use" in result.stderr


@pytest.mark.parametrize("yaml_text, expected", [
    ("name: a\nsource: {type: mllp, port: !!python/object:os.system x}\n", "a.yaml:2:28: YAML tag '!!python/object:os.system' is not allowed"),
    ("name: a\nsource: !foo {type: mllp, port: 1}\n", "a.yaml:2:9: YAML tag '!foo' is not allowed"),
    ("name: !!binary 'YWJj'\nsource: {type: mllp, port: 1}\n", "a.yaml:1:7: YAML tag '!!binary' is not allowed"),
    ("name: a\nsource: {type: mllp, port: !!int 'x'}\n", "a.yaml:2:28: cannot read 'x' as int"),
    ("name: a\nsource: {type: mllp, port: 1}\nx: &a [*a]\n", "a.yaml:3:4: a YAML alias that contains itself"),
    ("name: a\nsource: {type: mllp}\ndestinations: [{name: l, type: mllp, host: x, port: null}]\n",
     "a.yaml:3:53: port is empty"),
])
def test_lint_reports_yaml_tags_and_empty_values_at_their_position(capsys, tmp_path, monkeypatch, yaml_text, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text(yaml_text)
    code, output = run(capsys, ["lint", "a.yaml"])
    assert code == 1 and "Traceback" not in output and expected in output, output


def test_run_on_a_taken_port_says_so_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "ch.yaml").write_text(f"name: ch\nsource: {{type: mllp, port: {port}}}\n")
        result = subprocess.run([sys.executable, "-m", "hl7relay", "run", "--channels", str(tmp_path), "--data-dir",
                                 str(tmp_path / "data"), "--admin-port", "0", "--console-port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot start" in result.stderr and "in use" in result.stderr and str(port) in result.stderr


def test_the_engine_settings_come_from_specs_listed_and_as_a_schema(capsys, tmp_path):
    import jsonschema
    import yaml

    code, out = run(capsys, ["list"])
    assert code == 0 and "engine settings (config/hl7relay.yaml):" in out and "stop_timeout: duration, default 10.0" in out
    code, out = run(capsys, ["list", "--settings-schema"])
    schema = json.loads(out)
    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "config" / "hl7relay.yaml").read_text())
    jsonschema.validate(shipped, schema)  # the shipped file is valid against it
    jsonschema.validate({"admin": {"port": "auto", "host": "127.0.0.1"}, "log_level": "debug"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"admin": {"port": 70000}}, schema)
    (tmp_path / "typo.yaml").write_text("log_levle: info\nadmin: {prot: 1}\n")
    code, output = run(capsys, ["status", "--config", str(tmp_path / "typo.yaml")])
    assert code != 0 and "typo.yaml:1:1: unknown key 'log_levle'" in output and "(did you mean 'log_level')" in output
    assert "typo.yaml:2:9: unknown key 'prot'" in output
    jsonschema.validate({"console": {"port": "auto", "tls_cert": "c.pem", "idle_timeout": 600}}, schema)
    (tmp_path / "console.yaml").write_text("console: {hots: 0.0.0.0, port: 99999}\n")
    code, output = run(capsys, ["status", "--config", str(tmp_path / "console.yaml")])
    assert code != 0 and "console.yaml:1:11: unknown key 'hots' for settings 'console' (did you mean 'host')" in output


def test_the_console_is_not_served_in_plain_http_off_this_machine(tmp_path):
    (tmp_path / "ch.yaml").write_text("name: ch\nsource: {type: mllp, port: 0}\n")
    command = [sys.executable, "-m", "hl7relay", "run", "--channels", str(tmp_path), "--data-dir", str(tmp_path / "data"),
               "--admin-port", "0", "--console-port", "auto", "--console-host", "0.0.0.0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not starting: the console would serve plain HTTP on 0.0.0.0" in result.stderr
    assert not (tmp_path / "data" / "hl7relay.db").exists()  # refused before anything was opened
