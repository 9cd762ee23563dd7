import pytest

from hl7relay.errors import PathError
from hl7relay.hl7.path import Path, parse_path


@pytest.mark.parametrize("text, expected", [
    ("PID-5", Path("PID", 1, 5, None, None, None)),
    ("PID-5.1", Path("PID", 1, 5, None, 1, None)),
    ("PID-5.1.2", Path("PID", 1, 5, None, 1, 2)),
    ("PID-3[2].1", Path("PID", 1, 3, 2, 1, None)),
    ("OBX[3]-5", Path("OBX", 3, 5, None, None, None)),
    ("MSH-9.2", Path("MSH", 1, 9, None, 2, None)),
    ("PID.5.1", Path("PID", 1, 5, None, 1, None)),
    ("PID-5-1-2", Path("PID", 1, 5, None, 1, 2)),
    ("ZP1-2", Path("ZP1", 1, 2, None, None, None)),
])
def test_paths_parse(text, expected):
    assert parse_path(text) == expected


@pytest.mark.parametrize("text", ["PID", "pid-5", "PID-", "PID-0", "PID[0]-1", "PID-5.0", "PID-5.1.2.3", "PI-5", "", "PID-5[x]"])
def test_bad_paths_say_why(text):
    with pytest.raises(PathError, match="HL7 path|start at 1"):
        parse_path(text)


def test_path_prints_back():
    for text in ("PID-5", "PID-3[2].1", "OBX[3]-5", "PID-5.1.2"):
        assert str(parse_path(text)) == text
