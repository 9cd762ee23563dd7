"""Environments (issue #30, first step): environments/NAME.yaml values for ${env:NAME}, --env on
every verb, lint --all-envs, diff between two environments, and the running engine saying where
it runs (start line, console banner, metric)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from hl7relay.environments import load_environment, render

CHANNEL = textwrap.dedent("""\
    name: adt
    source: {type: mllp, port: "${env:ADT_PORT}"}
    destinations:
      - {name: lab, type: mllp, host: "${env:LAB_HOST}", port: "${LAB_PORT:-2576}"}
      - {name: api, type: http, url: "https://${env:API_HOST}/v1"}
    """)
WITH_SECRET = CHANNEL.replace('/v1"}', '/v1", headers: {X-Key: "${secret:api-key}"}}')


def workspace(tmp_path, environments: dict) -> None:
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text(CHANNEL)
    (tmp_path / "environments").mkdir()
    for name, text in environments.items():
        (tmp_path / "environments" / f"{name}.yaml").write_text(textwrap.dedent(text))


def hl7relay(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "hl7relay", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_an_environment_is_values_and_its_problems_say_where(tmp_path):
    (tmp_path / "prod.yaml").write_text("LAB_HOST: lab.prod\nLAB_PORT: 2576\nDEBUG: false\nread_only: true\n")
    environment, errors = load_environment(tmp_path, "prod")
    assert errors == [] and environment.values == {"LAB_HOST": "lab.prod", "LAB_PORT": "2576", "DEBUG": "false"}
    assert (environment.colour, environment.read_only) == ("red", True)  # prod is red unless it says otherwise
    (tmp_path / "test.yaml").write_text("LAB_HOST: [a, b]\ncolour: pink\n'bad key': 1\n")
    _, errors = load_environment(tmp_path, "test")
    text = [str(e) for e in errors]
    assert any(t.startswith(f"{tmp_path / 'test.yaml'}:1:11: LAB_HOST: a plain value") for t in text), text
    assert any(":2:9: colour: one of red, amber, green, blue, grey" in t for t in text), text
    assert any(":3:1: 'bad key' is not a variable name" in t for t in text), text
    _, errors = load_environment(tmp_path, "staging")
    assert "no environment 'staging'" in str(errors[0]) and "environments: prod, test" in str(errors[0])


def test_a_channel_takes_its_environments_values(tmp_path):
    workspace(tmp_path, {"test": "ADT_PORT: 12575\nLAB_HOST: lab.test\nAPI_HOST: api.test\n",
                         "broken": "ADT_PORT: twelve\nLAB_HOST: lab\nAPI_HOST: api\n"})
    done = hl7relay(tmp_path, "lint", "channels", "--env", "test")
    assert done.returncode == 0 and done.stdout.strip() == "1 channel OK: adt", done.stdout + done.stderr
    assert hl7relay(tmp_path, "lint", "channels").returncode == 1  # without it, ADT_PORT is nobody's
    broken = hl7relay(tmp_path, "lint", "channels", "--env", "broken")
    assert re.search(r"channels/adt.yaml:2:\d+: .*port must be a whole number", broken.stdout), broken.stdout
    unknown = hl7relay(tmp_path, "lint", "channels", "--env", "nowhere")
    assert "no environment 'nowhere'" in unknown.stdout + unknown.stderr


def test_lint_all_envs_finds_the_variable_prod_lacks_even_when_the_shell_has_it(tmp_path):
    workspace(tmp_path, {"test": "ADT_PORT: 12575\nLAB_HOST: lab.test\nAPI_HOST: api.test\n",
                         "prod": "ADT_PORT: 2575\nAPI_HOST: api.prod\n"})
    done = hl7relay(tmp_path, "lint", "channels", "--all-envs", env={"LAB_HOST": "from-the-shell"})
    assert done.returncode == 1
    assert "channels/adt.yaml:4:35: [prod] environment variable LAB_HOST is not set in environment prod" in done.stdout, \
        done.stdout
    assert "[test] environment variable" not in done.stdout
    assert done.stdout.strip().splitlines()[-1].endswith("under 2 environments (prod, test)")


def test_diff_shows_what_two_environments_make_of_the_channels_and_never_a_secret(tmp_path):
    workspace(tmp_path, {"test": "ADT_PORT: 12575\nLAB_HOST: lab.test\nAPI_HOST: api.test\n",
                         "prod": "ADT_PORT: 2575\nLAB_HOST: lab.prod\nAPI_HOST: api.test\nLAB_PORT: 3576\n"})
    done = hl7relay(tmp_path, "diff", "--env", "test", "--env", "prod")
    assert done.returncode == 1, done.stdout + done.stderr
    changed = [line for line in done.stdout.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ['-source: {type: mllp, port: "12575"}', '+source: {type: mllp, port: "2575"}',
                       '-  - {name: lab, type: mllp, host: "lab.test", port: "2576"}',
                       '+  - {name: lab, type: mllp, host: "lab.prod", port: "3576"}']
    same = hl7relay(tmp_path, "diff", "--env", "test", "--env", "test")
    assert same.returncode == 0 and "the same in test and test" in same.stdout
    assert "${secret:api-key}" in render(WITH_SECRET, {"API_HOST": "x"})  # a secret stays its reference
    assert hl7relay(tmp_path, "diff", "--env", "test").returncode == 2


def start_engine(folder, env: str, console: str = "auto"):
    """`hl7relay run --env ENV` in ``folder``: (the process, its start lines up to "ready")."""
    process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--env", env, "--admin-port", "auto",
                                "--console-port", console], cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list = []
    deadline = time.monotonic() + 60
    try:
        while not any(line.startswith("ready") for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, lines
            lines.append(process.stdout.readline())
    except BaseException:
        stop_engine(process)
        raise
    return process, "".join(lines)


def stop_engine(process) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    process.stdout.close()


def test_the_running_engine_says_its_environment_in_its_start_line_console_and_metrics(tmp_path):
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text('name: adt\nsource: {type: mllp, port: "${env:ADT_PORT}"}\n')
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "prod.yaml").write_text("ADT_PORT: 0\n")
    process, text = start_engine(tmp_path, "prod")
    try:
        assert "environment prod (environments/prod.yaml)" in text
        console = re.search(r"console: (http://[^/\s]+)/", text).group(1)
        admin = re.search(r"admin: (http://[^/\s]+)/metrics", text).group(1)
        with urllib.request.urlopen(console + "/login", timeout=30) as page:
            body = page.read().decode()
        assert 'class="environment environment-red" id="environment" role="note">PROD</div>' in body
        with urllib.request.urlopen(admin + "/metrics", timeout=30) as page:
            assert 'hl7relay_environment{environment="prod"} 1.0' in page.read().decode()
    finally:
        stop_engine(process)


@pytest.mark.parametrize("text", ["LAB: 1\n", "read_only: true\n"])
def test_an_environment_name_is_lower_case(tmp_path, text):
    (tmp_path / "Prod.yaml").write_text(text)
    _, errors = load_environment(tmp_path, "Prod")
    assert "is not an environment name" in str(errors[0])


def test_the_readme_environment_example_works_as_written(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Environments: dev, test and prod from the same channel files")[1].split("\n### ")[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    prod, part = blocks[0], blocks[1]
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "prod.yaml").write_text(prod)
    (tmp_path / "environments" / "test.yaml").write_text("API_HOST: api.test\nLAB_PORT: 2576\n")  # no LAB_HOST
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt-to-lab.yaml").write_text(
        "name: adt-to-lab\nsource: {type: mllp, port: 2575}\n" + part.split("\n", 1)[1])
    done = hl7relay(tmp_path, "lint", "channels", "--env", "prod")
    assert done.returncode == 0 and done.stdout.strip() == "1 channel OK: adt-to-lab", done.stdout + done.stderr
    every = hl7relay(tmp_path, "lint", "channels", "--all-envs")
    shown = [line for line in section.splitlines() if "[prod] environment variable" in line][0].strip().rstrip(".").strip("`")
    assert shown.replace("[prod]", "[test]").replace("environment prod", "environment test") in every.stdout, every.stdout


def test_a_read_only_environment_holds_every_delivery_and_will_not_resume_one(tmp_path):
    """read_only: true (a PMS sandbox): messages are received, processed and stored, their
    deliveries held (nothing reaches the listening peer), and no one can resume a destination."""
    import socket

    from hl7relay.mllp.framing import MLLPFramer, frame
    from hl7relay.store.database import Store

    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen(5)
    peer.setblocking(False)
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\n"
        "destinations: [{name: lab, type: mllp, host: 127.0.0.1, port: '${env:LAB_PORT}', retry_initial: 0.1}]\n")
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "sandbox.yaml").write_text(f"LAB_PORT: {peer.getsockname()[1]}\nread_only: true\n")
    process, text = start_engine(tmp_path, "sandbox", console="0")
    try:
        assert "environment sandbox (environments/sandbox.yaml, read only)" in text
        assert "read only: every destination holds what it would send" in text
        port = int(text.split("MLLP on 127.0.0.1:")[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as pms:
            pms.sendall(frame(b"MSH|^~\\&|PMS|C|LAB|L|20240105||ADT^A04^ADT_A01|RO1|P|2.5.1\rPID|1||1^^^H^MR||DOE^JANE\r"))
            framer, answer = MLLPFramer(), []
            while not answer:
                answer = framer.feed(pms.recv(65536))
        assert b"MSA|AA|RO1" in answer[0].payload  # received and stored: the sender is answered as always
        status = hl7relay(tmp_path, "destination", "resume", "adt", "lab", "--reason", "try", "--env", "sandbox")
        assert status.returncode != 0 and "read only" in status.stderr, status.stdout + status.stderr
        shown = hl7relay(tmp_path, "status", "--env", "sandbox")
        assert "-> lab (mllp)" in shown.stdout and "queued 1" in shown.stdout, shown.stdout
        with pytest.raises(BlockingIOError):
            peer.accept()  # the queue never even connected
    finally:
        stop_engine(process)
        peer.close()
    deliveries = Store(f"sqlite:///{tmp_path / 'data' / 'hl7relay.db'}").get_message(1)["deliveries"]
    assert [(d["destination"], d["status"], d["attempts"]) for d in deliveries] == [("lab", "QUEUED", 0)]
