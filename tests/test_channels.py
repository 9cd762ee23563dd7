"""Channel files: lint errors with file:line:col, the pipeline, specs, schema, shipped channels."""

import json
import textwrap
from pathlib import Path

import pytest

from hl7relay.channels import Result, load_channel, load_channels, process
from hl7relay.channels.schema import channel_schema
from hl7relay.spec import registry
from hl7relay.cli import main
from hl7relay.hl7.message import Message

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
name: demo
source: {type: mllp, port: 12575}
filters:
  - message_type: ADT
transformers:
  - set: {path: MSH-5, value: LAB}
destinations:
  - {name: out, type: file, directory: out}
"""


def write(tmp_path, text, name="demo.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(tmp_path, text, environ=None):
    path = write(tmp_path, text)
    _, errors = load_channel(path, environ or {}, display_name="channels/demo.yaml")
    return [str(e) for e in errors]


@pytest.mark.parametrize("text, expected", [
    # unknown key, with a suggestion
    (GOOD.replace("filters:", "fitlers:"), "channels/demo.yaml:3:1: unknown key 'fitlers' (did you mean 'filters')"),
    # unknown option of a component
    (GOOD.replace("{type: mllp, port: 12575}", "{type: mllp, prot: 12575}"),
     "channels/demo.yaml:2:22: unknown key 'prot' for source 'mllp' (did you mean 'port')"),
    # wrong type
    (GOOD.replace("port: 12575", "port: twelve"), "channels/demo.yaml:2:28: port must be a whole number, not 'twelve'"),
    # a destination port no peer can listen on: messages queued for ever
    *[(GOOD.replace("{name: out, type: file, directory: out}", f"{{name: out, type: mllp, host: h, port: {port}}}"),
       f"channels/demo.yaml:8:5: destination 'mllp': port {port} is not a port a peer can listen on (1 to 65535)")
      for port in (70000, -1, 0)],
    # bad enum value
    (GOOD + "response: {when: on_stor}\n",
     "channels/demo.yaml:9:18: when must be one of on_store, after_delivery, not 'on_stor' (did you mean 'on_store')"),
    # missing required key
    (GOOD.replace("{name: out, type: file, directory: out}", "{name: out, type: file}"),
     "channels/demo.yaml:8:5: destination 'file' needs 'directory' (output folder (created if missing))"),
    # unknown component name
    (GOOD.replace("- set:", "- sett:"), "channels/demo.yaml:6:5: unknown transformer 'sett' (did you mean 'set')"),
    (GOOD.replace("- message_type: ADT", "- mesage_type: ADT"),
     "channels/demo.yaml:4:5: unknown filter rule 'mesage_type' (did you mean 'message_type')"),
    (GOOD.replace("type: file,", "type: fil,"), "channels/demo.yaml:8:23: unknown destination type 'fil' (did you mean 'file')"),
    # invalid HL7 path
    (GOOD.replace("path: MSH-5", "path: MSH5"), "channels/demo.yaml:6:17: invalid HL7 path"),
    # unreadable lookup file
    (GOOD.replace("  - set: {path: MSH-5, value: LAB}", "  - map: {path: PV1-2, file: nope.csv}"),
     "channels/demo.yaml:6:10: transformer 'map': cannot read"),
    # bad regular expression
    (GOOD.replace("- message_type: ADT", "- field: {path: PID-5.1, regex: 'DOE('}"),
     "channels/demo.yaml:4:35: regex: invalid regular expression"),
    # YAML syntax
    (GOOD.replace("filters:", "filters: [unclosed"), "channels/demo.yaml:4:17: YAML syntax"),
    # missing environment variable without a default
    (GOOD.replace("directory: out", "directory: '${OUT_DIR}'"), "channels/demo.yaml:8:40: environment variable OUT_DIR is not set"),
    # duplicate keys
    (GOOD + "name: again\n", "channels/demo.yaml:9:1: duplicate key 'name'"),
    # an allow list entry that is not a CIDR
    (GOOD.replace("port: 12575}", "port: 12575, allow: [10.1.2.0/24, 10.1.300.0/24]}"),
     "channels/demo.yaml:2:9: source 'mllp': allow: '10.1.300.0/24' is not an address or CIDR"),
    # the channel's own keys, checked by the channel's spec
    (GOOD.replace("source: {type: mllp, port: 12575}\n", ""), "channels/demo.yaml:1:1: the channel needs 'source'"),
    (GOOD + "enabled: maybe\n", "channels/demo.yaml:9:10: enabled must be true or false, not 'maybe'"),
    (GOOD + "log_level: verbose\n", "channels/demo.yaml:9:12: log_level must be one of error, warn, info, debug, trace"),
    (GOOD + "response: {whne: on_store}\n", "channels/demo.yaml:9:12: unknown key 'whne' for response (did you mean 'when')"),
    (GOOD + "duplicates: {window: soon}\n", "channels/demo.yaml:9:22: window must be seconds (a number) (0 or more)"),
    (GOOD + "duplicates: 3\n", "channels/demo.yaml:9:13: duplicates takes a mapping of options: key, window"),
    (GOOD + "retention: {days: 7, error_days: 30}\n",
     "channels/demo.yaml:9:22: unknown key 'error_days' for retention (did you mean 'errors_days')"),
    (GOOD + "storage: {stages: [transformed, ack]}\n",
     "channels/demo.yaml:9:33: unknown stage 'ack'; stages: transformed, destinations, acks (did you mean 'acks')"),
])
def test_each_lint_error_has_its_position(tmp_path, text, expected):
    errors = errors_of(tmp_path, text)
    assert any(e.startswith(expected) for e in errors), errors


def test_every_error_is_reported_at_once(tmp_path):
    text = GOOD.replace("filters:", "fitlers:").replace("port: 12575", "port: x").replace("- set:", "- sett:")
    assert len(errors_of(tmp_path, text)) == 3


def test_environment_substitution_with_defaults(tmp_path):
    text = GOOD.replace("port: 12575", "port: '${P:-12999}'").replace("directory: out", "directory: '${D}'")
    channel, errors = load_channel(write(tmp_path, text), {"D": "/srv/out"})
    assert not errors
    assert channel.source.listener.port == 12999 and channel.destinations[0].config.directory == "/srv/out"


def test_secrets_from_files_are_remembered(tmp_path):
    (tmp_path / "secret.txt").write_text("s3cret\n")
    channel, errors = load_channel(write(tmp_path, GOOD.replace("value: LAB", "value: '${file:secret.txt}'")), {})
    assert not errors and channel.secrets == {"s3cret"}


def test_duplicate_names_ports_and_unknown_channel_destinations(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD.replace("- {name: out, type: file, directory: out}", "- {name: next, type: channel, channel: nowhere}"), "b.yaml")
    _, errors = load_channels([tmp_path], {})
    text = [str(e) for e in errors]
    assert any("duplicate channel name 'demo'" in e for e in text)
    assert any("port 12575 on 127.0.0.1 is already used by channel 'demo'" in e for e in text)
    assert any("names channel 'nowhere', which does not exist" in e for e in text)


# -- the pipeline -----------------------------------------------------------------------------------
ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A01^ADT_A01|MSG1|P|2.5.1\r"
       "EVN|A01|20240105093512\rPID|1||100234^^^CLINIC^MR||doe^jane^^^^^L||19800412|F\rPV1|1|O\rNTE|1||x\rNTE|2||y\r")


def channel_from(tmp_path, body):
    channel, errors = load_channel(write(tmp_path, "name: t\nsource: {type: mllp, port: 12600}\n" + textwrap.dedent(body)), {})
    assert not errors, errors
    return channel


@pytest.mark.parametrize("rule, passes", [
    ("- message_type: ADT", True),
    ("- message_type: [ORU, SIU]", False),
    ("- event: [A04, A01]", True),
    ("- sending_application: PMS", True),
    ("- sending_facility: OTHER", False),
    ("- field: {path: PID-8, equals: F}", True),
    ("- field: {path: PID-8, in: [M, U]}", False),
    ("- field: {path: PID-5.1, regex: '^do'}", True),
    ("- field: {path: PID-19, exists: true}", False),
    ("- field: {path: PID-19, empty: true}", True),
    ("- any: [{event: A04}, {event: A01}]", True),
    ("- all: [{event: A01}, {message_type: ORU}]", False),
    ("- not: {event: A01}", False),
])
def test_filter_rules(tmp_path, rule, passes):
    channel = channel_from(tmp_path, f"filters:\n  {rule}\n")
    assert (process(channel, Message(ADT)).result is not Result.FILTERED) == passes


def test_transformer_steps(tmp_path):
    (tmp_path / "sex.csv").write_text("# sex map\nF,female\nM,male\n")
    channel = channel_from(tmp_path, """\
        transformers:
          - set: {path: MSH-5, value: "A|B"}
          - copy: {from: PID-5, to: NK1-2, create: true}
          - move: {from: PID-8, to: ZPI-1, create: true}
          - clear: PV1-2
          - delete_segment: NTE
          - add_segment: {segment: "ZAD|1|added", after: PID}
          - map: {path: ZPI-1, file: sex.csv, default: unknown}
          - map: {path: EVN-1, table: {A01: ADMIT}}
          - format_date: {path: PID-7, output: "%d/%m/%Y"}
          - upper: PID-5.1
          - trim: PID-5.2
          - replace: {path: MSH-10, regex: "MSG(\\\\d+)", with: "ID-\\\\1"}
        """)
    result = process(channel, Message(ADT))
    m = result.message
    assert result.result is Result.PROCESSED
    assert m.get("MSH-5") == "A|B" and m.get("NK1-2") == "doe^jane^^^^^L"
    assert m.get("PID-8") == "" and m.get("ZPI-1") == "female" and m.get("PV1-2") == ""
    assert m.count("NTE") == 0 and m.segment_names().index("ZAD") == m.segment_names().index("PID") + 1
    assert m.get("EVN-1") == "ADMIT" and m.get("PID-7") == "12/04/1980"
    assert m.get("PID-5.1") == "DOE" and m.get("MSH-10") == "ID-1"


ORU = ("MSH|^~\\&|LAB|LABFAC|PMS|CLINIC|20240105160000||ORU^R01^ORU_R01|T1|P|2.5.1\r"
       "PID|1||100234^^^CLINIC^MR~555^^^SSA^SS||DOE^JANE\r"
       "OBR|1|ORD1|LAB1|PANEL^Panel^L|||20240105090000\r"
       "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F\r"
       "OBX|2|NM|K^Potassium^L||4.1|mmol/L|||||F\r"
       "OBX|3|NM|XYZ^Unknown^L||1|x|||||F\r")


def test_a_step_applies_to_every_segment_and_repetition_a_star_names(tmp_path):
    """`map` touched only the first OBX and `OBX[*]` was refused: "for each OBX" is the first thing
    an analyst reaches for."""
    (tmp_path / "loinc.csv").write_text("GLU,2345-7\nK,2823-3\n")
    channel = channel_from(tmp_path, """\
        transformers:
          - copy: {from: "OBX[*]-3.1", to: "OBX[*]-3.4"}
          - map: {path: "OBX[*]-3.1", file: loinc.csv}
          - set: {path: "OBX[*]-11", value: C}
          - upper: "OBX[*]-3.2"
          - set: {path: "PID-3[*].5", value: XX}
          - lower: "OBX[*]-3.4"
        """)
    m = process(channel, Message(ORU)).message
    assert [m.get(f"OBX[{n}]-3") for n in (1, 2, 3)] == ["2345-7^GLUCOSE^L^glu", "2823-3^POTASSIUM^L^k", "XYZ^UNKNOWN^L^xyz"]
    assert [m.get(f"OBX[{n}]-11") for n in (1, 2, 3)] == ["C", "C", "C"] and m.count("OBX") == 3
    assert m.repetitions("PID-3") == ["100234^^^CLINIC^XX", "555^^^SSA^XX"]


def test_no_step_invents_a_segment_unless_it_says_create(tmp_path):
    """One `map` per index with `default:` invented a phantom `OBX|||UNMAPPED` that reached the PMS
    and the archive: a step writes only into segments the message has."""
    channel = channel_from(tmp_path, """\
        transformers:
          - map: {path: "OBX[4]-3.1", table: {GLU: "2345-7"}, default: UNMAPPED}
          - map: {path: "OBX[*]-5", table: {}, default: "0"}
          - set: {path: ZPI-1, value: x}
          - clear: NTE-3
          - copy: {from: PID-5, to: NK1-2}
          - map: {path: "NTE[*]-3", table: {}, default: y}
          - set: {path: ZRS-1, value: made, create: true}
        """)
    m = process(channel, Message(ORU)).message
    assert m.segment_names() == ["MSH", "PID", "OBR", "OBX", "OBX", "OBX", "ZRS"] and m.get("ZRS-1") == "made"
    assert [m.get(f"OBX[{n}]-5") for n in (1, 2, 3)] == ["0", "0", "0"]  # every OBX there is, and no fourth


def test_a_star_is_refused_where_a_path_names_one_value(tmp_path):
    channel_file = tmp_path / "c.yaml"
    channel_file.write_text('name: c\nsource: {type: mllp, port: 0}\nfilters:\n  - field: {path: "OBX[*]-5", equals: x}\n'
                            "destinations: [{name: d, type: file, directory: out}]\n")
    _, errors = load_channel(channel_file, {})
    assert any("[*] (every one) is for transformer steps" in str(e) for e in errors), errors


def test_an_unquoted_path_with_brackets_inside_braces_is_a_yaml_error_with_a_hint(tmp_path):
    channel_file = tmp_path / "c.yaml"
    channel_file.write_text("name: c\ntransformers:\n  - set: {path: OBX[1]-3.1, value: B}\n")
    _, errors = load_channel(channel_file, {})
    assert [str(e) for e in errors] == [f"{channel_file}:3:20: YAML syntax: expected ',' or '}}', but got '[' "
                                        '(quote paths that contain [ ] inside { }: path: "OBX[*]-3.1")']


ORU_TWO_ORDERS = ("MSH|^~\\&|LAB|LABFAC|PMS|CLINIC|20240105160000||ORU^R01^ORU_R01|T1|P|2.5.1\r"
                  "PID|1||100234^^^CLINIC^MR||DOE^JANE\r"
                  "OBR|1|ORD1|LAB1|GLU^Glucose^L\rNTE|1||order one\r"
                  "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F\rNTE|1||result one\r"
                  "OBR|2|ORD2|LAB2|K^Potassium^L\r"
                  "OBX|1|NM|K^Potassium^L||4.1|mmol/L|||||F\rOBX|2|NM|NA^Sodium^L||140|mmol/L|||||F\r")


def test_a_step_inside_groups_applies_to_each_group_instance(tmp_path):
    """Groups of the message's structure: each order's results, the order's own NTE told from a
    result's, and a copy within each order (its OBR's code into each of its OBX)."""
    channel = channel_from(tmp_path, """\
        transformers:
          - copy: {from: "ORDER_OBSERVATION[*]/OBR-4.1", to: "ORDER_OBSERVATION[*]/OBX[*]-3.4"}
          - set: {path: "ORDER_OBSERVATION[2]/OBX[*]-11", value: C}
          - set: {path: "OBSERVATION[*]/NTE-3", value: result note}
          - set: {path: "ORDER_OBSERVATION[*]/NTE-3", value: order note}
          - upper: "ORDER_OBSERVATION[1]/OBX[1]-3.2"
          - set: {path: "ORDER_OBSERVATION[2]/OBX[3]-5", value: invented}
          - copy: {from: "ORDER_OBSERVATION[*]/OBX[*]-1", to: "ORDER_OBSERVATION[*]/OBX[*]-4"}
        """)
    m = process(channel, Message(ORU_TWO_ORDERS)).message
    assert [m.get(f"OBX[{n}]-3.4") for n in (1, 2, 3)] == ["GLU", "K", "K"]  # each order's own OBR
    assert [m.get(f"OBX[{n}]-11") for n in (1, 2, 3)] == ["F", "C", "C"]
    assert [m.get(f"NTE[{n}]-3") for n in (1, 2)] == ["order note", "result note"]
    assert m.get("OBX[1]-3.2") == "GLUCOSE" and m.count("OBX") == 3  # no third result invented in order 2
    assert [m.get(f"OBX[{n}]-4") for n in (1, 2, 3)] == ["1", "1", "2"]  # paired within each order


def test_a_group_the_structure_does_not_have_is_a_transform_error(tmp_path):
    channel = channel_from(tmp_path, """\
        transformers:
          - set: {path: "ORDER_OBSERVATON[*]/OBX-11", value: C}
        """)
    result = process(channel, Message(ORU_TWO_ORDERS))
    assert result.result is Result.ERROR
    assert "has no group ORDER_OBSERVATON" in result.error and "ORDER_OBSERVATION" in result.error


def test_python_step_and_its_errors(tmp_path):
    channel = channel_from(tmp_path, "transformers:\n  - python: json:loads\n")
    result = process(channel, Message(ADT))
    assert result.result is Result.ERROR and "raised TypeError" in result.error
    _, errors = load_channel(write(tmp_path, "name: t\nsource: {type: mllp}\ntransformers:\n  - python: no_such_module_x:f\n"), {})
    assert "cannot import no_such_module_x" in str(errors[0])


def test_format_date_error_is_a_channel_error(tmp_path):
    channel = channel_from(tmp_path, "transformers:\n  - format_date: {path: PID-8, output: '%Y'}\n")
    result = process(channel, Message(ADT))
    assert result.result is Result.ERROR and "PID-8" in result.error


def test_validators_reject_or_warn(tmp_path):
    rejecting = channel_from(tmp_path, "validators:\n  - required: [PID-19, PID-3.1]\n")
    result = process(rejecting, Message(ADT))
    assert result.result is Result.ERROR and "PID-19 is required" in result.error
    warning = channel_from(tmp_path, "validators:\n  - required: {paths: [PID-19], on_error: warn}\n"
                                     "  - structure: {on_error: warn}\n")
    result = process(warning, Message(ADT))
    assert result.result is Result.PROCESSED
    texts = [f.text for f in result.findings]
    assert "PID-19 is required by this channel" in texts and any("NTE is not part of" in t for t in texts)
    strict = channel_from(tmp_path, "validators:\n  - structure: {}\n")
    assert process(strict, Message(ADT)).result is Result.ERROR  # NTE is not part of ADT_A01


def test_destinations_get_their_own_copies(tmp_path):
    channel = channel_from(tmp_path, """\
        destinations:
          - name: a
            type: file
            directory: out
            transformers: [{set: {path: MSH-5, value: A}}]
          - name: b
            type: file
            directory: out
            filters: [{event: A08}]
          - {name: c, type: file, directory: out}
        """)
    result = process(channel, Message(ADT))
    outputs = {o.name: o.message for o in result.outputs}
    assert outputs["a"].get("MSH-5") == "A" and outputs["b"] is None and outputs["c"].get("MSH-5") == "HL7RELAY"


# -- specs, list, schema, shipped channels ------------------------------------------------------------
def test_specs_describe_every_option():
    for spec in registry():
        assert spec.description
        for option in spec.options:
            assert option.description, (spec.kind, spec.name, option.name)


def test_the_channel_keys_come_from_the_channel_spec(tmp_path, capsys):
    """One declaration (channel.CHANNEL) gives the keys their checks, defaults, listing and schema."""
    from hl7relay.channels.channel import CHANNEL

    names = [option.name for option in CHANNEL.options]
    assert list(channel_schema()["properties"]) == names
    assert channel_schema()["required"] == [o.name for o in CHANNEL.options if o.required] == ["name", "source"]
    assert main(["list"]) == 0
    out = capsys.readouterr().out.split("sources:")[0]
    assert all(f"\n  {name}: " in out for name in names) and "      window: duration, default 86400.0." in out
    # defaults: absent sections are there with their own defaults, optional ones are off
    channel, errors = load_channel(write(tmp_path, GOOD), {})
    assert not errors and channel.enabled and channel.response.when == "on_store" and channel.response.filtered == "AR"
    assert channel.duplicates is None and channel.retention is None and channel.log_level is None
    assert channel.stages == {"transformed", "destinations", "acks"}
    channel, errors = load_channel(write(tmp_path, GOOD + "duplicates: true\nresponse: {filtered: AA}\n"), {})
    assert not errors and channel.duplicates.key == ("MSH-3", "MSH-4", "MSH-10") and channel.duplicates.window == 86400
    assert channel.response.filtered == "AA" and channel.response.when == "on_store"
    channel, errors = load_channel(write(tmp_path, GOOD + "duplicates: false\nretention: {days: 7}\n"), {})
    assert not errors and channel.duplicates is None and channel.retention.days == 7 and channel.retention.errors_days == 90


def test_list_and_schema(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "transformers:" in out and "  map: " in out and "      file: str, default None." in out
    assert main(["list", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == channel_schema() and "source" in schema["properties"]


def test_schema_accepts_the_shipped_channels():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    for path in sorted((REPO / "channels").glob("*.yaml")):
        if not path.name.endswith(".test.yaml"):
            jsonschema.validate(yaml.safe_load(path.read_text()), channel_schema())


def test_shipped_channels_lint_clean_and_their_tests_pass(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["lint"]) == 0
    assert "3 channels OK" in capsys.readouterr().out
    assert main(["test"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.strip().endswith("0 failed")


def test_a_failing_channel_test_says_what_differs(tmp_path, capsys):
    write(tmp_path, GOOD)
    write(tmp_path, """\
        cases:
          - name: wrong expectation
            message: |
              MSH|^~\\&|PMS|CLINIC|X|Y|20240101||ADT^A01|T1|P|2.5.1
            expect:
              ack: AE
              destinations:
                out: {MSH-5: LABB}
          - name: bad key
            message: nowhere.hl7
        """, "demo.test.yaml")
    assert main(["test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "ack: expected AE, got AA" in out and "MSH-5 expected 'LABB', got 'LAB'" in out
    assert "demo.test.yaml:10:14: message file 'nowhere.hl7' not found" in out


def test_a_channel_validates_with_its_sites_table_values(tmp_path):
    (tmp_path / "tables.yaml").write_text('"0396": [LOCALCS]\n')
    message = ("MSH|^~\\&|LAB|F|PMS|C|20240105||ORU^R01^ORU_R01|1|P|2.5.1\rPID|1||7||DOE^J\r"
               "OBR|1|O1|L1|GLU^Glucose^LN\rOBX|1|CWE|GLU^Glucose^LN||X^Y^LOCALCS||||||F\r")
    strict = channel_from(tmp_path, "validators:\n  - structure: {strict: true}\n")
    assert process(strict, Message(message)).result is Result.ERROR  # LOCALCS is in no HL7 table
    channel = channel_from(tmp_path, "validators:\n  - structure: {strict: true, table_values: tables.yaml}\n")
    assert process(channel, Message(message)).result is Result.PROCESSED
    (tmp_path / "bad.yaml").write_text('"0396": B\n')
    _, errors = load_channel(write(tmp_path, "name: t\nsource: {type: mllp, port: 12600}\n"
                                   "validators:\n  - structure: {table_values: bad.yaml}\n"), {})
    assert any("bad.yaml:1:9: table 0396: a list of values" in str(e) for e in errors), errors


def test_a_copy_keeps_an_escaped_delimiter_escaped(tmp_path):
    """copy decoded SMITH\\S\\JONES and wrote it raw: SMITH^JONES, two components where the
    sender had one value."""
    channel = channel_from(tmp_path, """\
        transformers:
          - copy: {from: PID-5.1, to: PID-9.1}
          - copy: {from: PID-5, to: NK1-2, create: true}
          - copy: {from: MSH-2, to: ZXX-1, create: true}
        """)
    m = process(channel, Message("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5.1\rEVN|A01|20240101\r"
                                 "PID|1||1||SMITH\\S\\JONES^ANN\rPV1|1|O\r")).message
    assert m.get("PID-9.1") == "SMITH^JONES" and m.get("PID-9.2") == ""  # one value, its ^ escaped
    assert m.get("NK1-2.1") == "SMITH^JONES" and m.get("NK1-2.2") == "ANN"  # a composite, as it was
    assert m.get("ZXX-1") == "^~\\&" and m.get("ZXX-1.2") == ""  # the delimiters, as text
