"""The vault: secrets channels name as ${secret:NAME}, encrypted in the store, never shown."""

import io
import stat
import sys

import pytest
import sqlalchemy as sa

from hl7relay.cli import main

SECRET = "s3cr3t-Client-Value-7f2"


def run(capsys, monkeypatch, *args, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    assert SECRET not in out + err  # never shown, whatever the verb
    return code, out, err


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HL7RELAY_VAULT_KEY", raising=False)
    monkeypatch.delenv("HL7RELAY_CONFIG", raising=False)
    return tmp_path


def test_secrets_are_set_rotated_listed_and_removed_encrypted_and_audited(folder, capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "secret", "set", "athena-secret", stdin=SECRET + "\n")
    assert code == 0 and out.strip() == "secret athena-secret created"
    key = folder / "data" / "vault.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # created private by the first set
    engine = sa.create_engine(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT ciphertext FROM secrets WHERE name = 'athena-secret'")).scalar()
        audit = connection.execute(sa.text("SELECT action, target, detail, reason FROM audit_log ORDER BY id")).all()
    assert SECRET.encode() not in stored and len(stored) > len(SECRET)
    assert run(capsys, monkeypatch, "secret", "set", "athena-secret", stdin="other")[0] == 1  # set never replaces
    assert run(capsys, monkeypatch, "secret", "rotate", "nope", stdin="x")[0] == 1
    code, out, _ = run(capsys, monkeypatch, "secret", "rotate", "athena-secret", stdin=SECRET + "-2")
    assert code == 0 and out.strip() == "secret athena-secret rotated"
    code, out, _ = run(capsys, monkeypatch, "secret", "list")
    assert code == 0 and "athena-secret" in out and "never" in out  # last used: no channel read it yet
    code, err = run(capsys, monkeypatch, "secret", "set", "9bad name", stdin="x")[0::2]
    assert code == 2 and "is not a secret name" in err
    assert run(capsys, monkeypatch, "secret", "set", "empty", stdin="")[0] == 1
    code, out, _ = run(capsys, monkeypatch, "secret", "rm", "athena-secret")
    assert code == 0 and run(capsys, monkeypatch, "secret", "rm", "athena-secret")[0] == 1
    with engine.connect() as connection:
        audit = connection.execute(sa.text("SELECT action, target FROM audit_log ORDER BY id")).all()
        everything = " ".join(str(v) for row in connection.execute(sa.text("SELECT * FROM audit_log")).all() for v in row)
    assert [tuple(r) for r in audit] == [("secret.set", "athena-secret"), ("secret.rotate", "athena-secret"),
                                         ("secret.rm", "athena-secret")]
    assert SECRET not in everything


CHANNEL = ("name: a\nsource: {type: mllp, port: 0}\n"
           "destinations:\n  - {name: d, type: file, directory: \"out/${secret:out-dir}\"}\n")


def test_a_channel_names_a_secret_and_lint_reads_it_from_the_vault(folder, capsys, monkeypatch):
    (folder / "channels").mkdir()
    (folder / "channels" / "a.yaml").write_text(CHANNEL)
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")
    assert code == 1 and "channels/a.yaml:4:38: ${secret:out-dir}: no vault key:" in out
    run(capsys, monkeypatch, "secret", "set", "other", stdin="x")  # the key and the store now exist
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")
    assert code == 1 and "channels/a.yaml:4:38: no secret 'out-dir' in the vault (hl7relay secret set out-dir)" in out
    run(capsys, monkeypatch, "secret", "set", "out-dir", stdin=SECRET)
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")
    assert code == 0 and "1 channel OK: a" in out

    from hl7relay.channels import load_channels

    channels, errors = load_channels(["channels"])  # the resolver lint registered: the value itself
    assert not errors and channels[0].destinations[0].config.directory == f"out/{SECRET}"
    code, out, _ = run(capsys, monkeypatch, "secret", "list")
    assert not out.split("out-dir")[1].splitlines()[0].rstrip().endswith("never")  # last used: now
    from cryptography.fernet import Fernet

    monkeypatch.setenv("HL7RELAY_VAULT_KEY", Fernet.generate_key().decode())  # another key: said, not guessed
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")
    assert code == 1 and "cannot be decrypted with this vault key" in out


def test_the_key_may_come_from_the_environment_and_env_references_keep_working(folder, capsys, monkeypatch):
    from cryptography.fernet import Fernet

    monkeypatch.setenv("HL7RELAY_VAULT_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("OUT_BASE", "base")
    assert run(capsys, monkeypatch, "secret", "set", "out-dir", stdin=SECRET)[0] == 0
    assert not (folder / "data" / "vault.key").exists()  # the environment's key: no key file written
    (folder / "channels").mkdir()
    (folder / "channels" / "a.yaml").write_text(CHANNEL.replace("out/${secret:out-dir}", "${env:OUT_BASE}/${secret:out-dir}"))
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")
    assert code == 0, out
    monkeypatch.setenv("HL7RELAY_VAULT_KEY", "not a key")
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")
    assert code == 1 and "the vault key in $HL7RELAY_VAULT_KEY is not a Fernet key" in out


def test_channel_tests_read_the_vault_too(folder, capsys, monkeypatch):
    (folder / "channels").mkdir()
    (folder / "channels" / "a.yaml").write_text(CHANNEL)
    (folder / "channels" / "a.test.yaml").write_text(
        "cases:\n  - name: filed\n    message: \"MSH|^~\\\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5.1\\rPID|1||7\\r\"\n"
        "    expect: {ack: AA}\n")
    code, out, _ = run(capsys, monkeypatch, "test", "channels")
    assert code == 1 and "no vault key" in out
    run(capsys, monkeypatch, "secret", "set", "out-dir", stdin=SECRET)
    code, out, _ = run(capsys, monkeypatch, "test", "channels")
    assert code == 0 and "PASS" in out, out


def test_a_credentials_section_of_the_engine_config_reads_the_vault_of_that_config(folder, capsys, monkeypatch):
    """The config file says where the vault is (data_dir) and names a secret in credentials: it is
    read once to find the vault, then again with it."""
    (folder / "config").mkdir()
    (folder / "config" / "hl7relay.yaml").write_text(
        "data_dir: site-data\n"
        "credentials:\n"
        "  pms-api: {type: basic, username: hl7relay, password: '${secret:pms-password}'}\n")
    (folder / "channels").mkdir()
    (folder / "channels" / "a.yaml").write_text(
        "name: a\nsource: {type: mllp, port: 0}\n"
        "destinations: [{name: pms, type: http, url: 'https://pms.example/api', credentials: pms-api}]\n")
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")
    assert code == 1 and "config/hl7relay.yaml:3:56: ${secret:pms-password}: no vault key:" in out, out
    run(capsys, monkeypatch, "secret", "set", "pms-password", stdin=SECRET)
    assert (folder / "site-data" / "vault.key").exists()  # the config's data_dir, not ./data
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")
    assert code == 0 and "1 channel OK: a" in out, out

    from hl7relay.apiclient.credentials import loaded_credentials

    assert loaded_credentials()["pms-api"].secret == SECRET and SECRET not in repr(loaded_credentials())
    (folder / "config" / "hl7relay.yaml").write_text(
        "credentials:\n  pms-api: {type: basic, username: hl7relay, password: " + SECRET + "}\n")
    code, out, _ = run(capsys, monkeypatch, "lint", "channels")  # (run() checks the value is not echoed)
    assert code == 1 and "config/hl7relay.yaml:2:56: password is written in the file: keep it in the vault" in out
