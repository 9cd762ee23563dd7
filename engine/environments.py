"""Environments: one set of values per place the channels run (dev, test, prod).

``environments/<name>.yaml`` holds only values: a mapping of variable names (``LAB_HOST``,
``LAB_PORT``) to plain values, and settings of the engine's own, in lower case: ``colour``
(the console's banner: red, amber, green, blue or grey; by default red for prod*, amber for test
and staging, green for dev), ``read_only`` (a PMS sandbox: said on the banner), ``promoted_only``
(an engine in it runs only channel files promoted to it: hl7relay promote) and ``approvals``
(how many admins a promotion to it needs: 2 is four eyes). Channel files
use ``${env:LAB_HOST}`` (or ``${LAB_HOST}``): under ``--env prod`` the value comes from the
environment's file first, then from the process's environment variables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hl7relay.yamlsource import ConfigError, load_document

__all__ = ["Environment", "load_environment", "environment_names", "render", "COLOURS", "ENVIRONMENT_NAME"]

ENVIRONMENT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
COLOURS = ("red", "amber", "green", "blue", "grey")
_RESERVED = {"colour", "read_only", "promoted_only", "approvals"}


@dataclass(frozen=True, slots=True)
class Environment:
    name: str
    file: str
    values: dict = field(default_factory=dict)  # variable -> its text
    colour: str = "blue"
    read_only: bool = False
    promoted_only: bool = False  # runs only channel files promoted to it (hl7relay promote)
    approvals: int = 1  # admins a promotion to it needs (2: a second one approves)

    def describe(self) -> str:
        extra = (", read only" if self.read_only else "") + (", promoted files only" if self.promoted_only else "")
        return f"environment {self.name} ({self.file}{extra})"


def _default_colour(name: str) -> str:
    if name.startswith("prod"):
        return "red"
    if name.startswith(("test", "stag", "uat")):
        return "amber"
    if name.startswith("dev"):
        return "green"
    return "blue"


def environment_names(folder: str | Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if ENVIRONMENT_NAME.match(p.stem))


def load_environment(folder: str | Path, name: str) -> tuple[Environment | None, list[ConfigError]]:
    """The environment ``name`` from ``folder``, or its problems (file:line:col)."""
    from hl7relay.yamlsource import Mark

    if not ENVIRONMENT_NAME.match(name or ""):
        return None, [ConfigError(Mark(str(folder), 0, 0), f"{name!r} is not an environment name (lower case letters, "
                                                          "digits, - and _: dev, test, prod)")]
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(environment_names(folder)) or "none"
        return None, [ConfigError(Mark(str(path), 0, 0), f"no environment {name!r} ({path} does not exist; "
                                                         f"environments: {known})")]
    doc = load_document(path, environ={})  # an environment's values are literal
    if doc.errors:
        return None, list(doc.errors)
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        doc.error((), "an environment is a mapping of names to values: LAB_HOST: lab.example")
        return None, list(doc.errors)
    values: dict[str, str] = {}
    colour, read_only = _default_colour(name), False
    promoted_only, approvals = False, 1
    for key, value in data.items():
        if key == "promoted_only":
            if not isinstance(value, bool):
                doc.error((key,), "promoted_only: true or false")
            else:
                promoted_only = value
            continue
        if key == "approvals":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2:
                doc.error((key,), "approvals: how many admins a promotion needs, 1 or 2 (2: four eyes)")
            else:
                approvals = value
            continue
        if key == "colour":
            if value not in COLOURS:
                doc.error((key,), f"colour: one of {', '.join(COLOURS)}")
            else:
                colour = value
            continue
        if key == "read_only":
            if not isinstance(value, bool):
                doc.error((key,), "read_only: true or false")
            else:
                read_only = value
            continue
        if not _VARIABLE.match(key) or key.lower() in _RESERVED:
            doc.error((key,), f"{key!r} is not a variable name (LAB_HOST, LAB_PORT: letters, digits and _)", key=True)
            continue
        if isinstance(value, bool):
            values[key] = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            values[key] = str(value)
        else:
            doc.error((key,), f"{key}: a plain value (text, a number, true/false), not a list or a mapping")
    if doc.errors:
        return None, list(doc.errors)
    return Environment(name, str(path), values, colour, read_only, promoted_only, approvals), []


def render(text: str, values: dict, keep_missing: bool = False) -> str:
    """A channel file's text with an environment's values in place of ``${env:NAME}`` and
    ``${NAME}`` (their defaults where it has none); ``${secret:...}`` and ``${file:...}`` stay the
    references they are (a value is never shown); a variable it lacks says so, or with
    ``keep_missing`` stays the reference it is (the process's own variables are read when it loads)."""
    from hl7relay.yamlsource import _VARIABLE as PLACEHOLDER

    def replace(match):
        name, default = match.group("name"), match.group("default")
        if name.startswith(("secret:", "file:")):
            return match.group(0)
        name = name.removeprefix("env:")
        if name in values:
            return values[name]
        if keep_missing:
            return match.group(0)
        return default if default is not None else f"<{name} not set>"

    return PLACEHOLDER.sub(replace, text)
