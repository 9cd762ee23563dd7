"""YAML with positions: every key and value keeps its ``file:line:col``, so config errors are data.

Loading uses PyYAML's safe composer (no Python objects, no eval), and only YAML's plain types:
a tag (``!foo``, ``!!python/object``, ``!!binary``, ``!!set``...) is an error at its position, and
so is an alias that contains itself. ``${VAR}``,
``${VAR:-default}`` and ``${file:PATH}`` in string values are replaced from the environment or a
file, so one channel file serves development, test and production; ``${env:VAR}`` says the same
as ``${VAR}``; ``${secret:NAME}`` comes from the vault (hl7relay.vault, through the resolver the
settings register: :func:`set_secret_resolver`). Values that came from a file or the vault are
remembered as secrets and can be masked wherever config is shown.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["Mark", "ConfigError", "Document", "load_document", "SECRET_MASK", "set_secret_resolver", "set_environment",
           "current_environment", "ONLY_ENVIRONMENT", "reading_snapshot", "read_config_text", "collecting_reads",
           "snapshot_listing"]

SECRET_MASK = "******"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*|env:[A-Za-z_][A-Za-z0-9_]*|file:[^}]+|secret:[^}:]+)"
                       r"(?::-(?P<default>[^}]*))?\}")
# name -> value (None: no such secret; an exception: the vault cannot be read), set by the settings
_secret_resolver = None
# the values of the environment the process runs in (--env), over the process's own variables
_environment: dict = {}
_environment_name = ""


# the files of a configuration snapshot, read in place of the disk's (config rollback, replay as
# processed): absolute path -> text. Per context (a thread reading one does not change another's).
_snapshot_files: contextvars.ContextVar[dict | None] = contextvars.ContextVar("snapshot_files", default=None)


@contextlib.contextmanager
def reading_snapshot(files: dict):
    """Within it, the configuration files a snapshot holds are read from it (those it does not
    hold, such as certificates, from the disk), and a folder lists the files it held."""
    token = _snapshot_files.set({os.path.abspath(path): text for path, text in files.items()})
    try:
        yield
    finally:
        _snapshot_files.reset(token)


# the configuration files read while one is collecting (a channel's load: its fingerprint covers
# the lookup tables, maps and profiles it names, so a reload sees a change in any of them)
_files_read: contextvars.ContextVar[list | None] = contextvars.ContextVar("files_read", default=None)


@contextlib.contextmanager
def collecting_reads():
    """Within it, each configuration file read is listed (path, text) in the list it gives."""
    reads: list = []
    token = _files_read.set(reads)
    try:
        yield reads
    finally:
        _files_read.reset(token)


def read_config_text(path, errors: str = "strict") -> str:
    """A configuration file's text: from the snapshot being read, or from the disk."""
    files = _snapshot_files.get()
    text = files.get(os.path.abspath(path)) if files is not None else None
    if text is None:
        text = Path(path).read_text(encoding="utf-8", errors=errors)
    reads = _files_read.get()
    if reads is not None:
        reads.append((str(path), text))
    return text


def snapshot_listing(folder, suffixes: tuple) -> list[Path] | None:
    """The files directly in ``folder`` that the snapshot being read held (None: none is read)."""
    files = _snapshot_files.get()
    if files is None:
        return None
    where = os.path.abspath(folder)
    relative = Path(folder)
    return sorted(relative / Path(path).name for path in files
                  if os.path.dirname(path) == where and Path(path).suffix.lower() in suffixes)


class _OnlyEnvironment(dict):
    """A marker environ: the environment's values alone (not the process's variables)."""


ONLY_ENVIRONMENT = _OnlyEnvironment()


def current_environment() -> tuple[str, dict]:
    """The environment the process runs in (its name, "" for none) and its values."""
    return _environment_name, dict(_environment)


def set_environment(name: str, values: dict) -> None:
    """The environment (``--env``) whose values ``${env:NAME}`` and ``${NAME}`` take first."""
    global _environment, _environment_name
    _environment, _environment_name = dict(values), name


def set_secret_resolver(resolver) -> None:
    """Where ``${secret:NAME}`` values come from (the settings' vault), for this process."""
    global _secret_resolver
    _secret_resolver = resolver


@dataclass(frozen=True, slots=True)
class Mark:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem in a config file: ``channels/adt.yaml:12:5: unknown key 'fitler' (did you mean 'filter')``."""

    mark: Mark
    message: str

    def __str__(self) -> str:
        return f"{self.mark}: {self.message}"


@dataclass(slots=True)
class Document:
    """Plain data (dicts, lists, scalars) plus where each piece came from.

    ``marks[path]`` is the position of the value at ``path`` (a tuple of keys and indexes);
    ``key_marks[path]`` the position of the key that introduced it.
    """

    file: str
    data: object
    marks: dict = field(default_factory=dict)
    key_marks: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    secrets: set = field(default_factory=set)
    substituted: set = field(default_factory=set)  # paths whose values came (in part) from ${...}

    def mark(self, path: tuple, key: bool = False) -> Mark:
        table = self.key_marks if key else self.marks
        while path not in table and path:
            path = path[:-1]
        return table.get(path) or self.marks.get((), Mark(self.file, 1, 1))

    def error(self, path: tuple, message: str, key: bool = False) -> None:
        self.errors.append(ConfigError(self.mark(path, key), message))


def _mark(file: str, node) -> Mark:
    return Mark(file, node.start_mark.line + 1, node.start_mark.column + 1)


_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in
                        ("str", "int", "float", "bool", "null", "seq", "map", "timestamp"))
_MAX_DEPTH = 64  # channel files are shallow; deeper is an alias bomb or a mistake


class _Builder:
    def __init__(self, doc: Document, environ, base: Path):
        self.doc = doc
        self.environ = environ
        self.base = base
        self.constructor = yaml.constructor.SafeConstructor()
        self._open: set[int] = set()  # nodes being built: an alias back to one of them is a cycle

    def build(self, node, path: tuple):
        doc = self.doc
        doc.marks[path] = _mark(doc.file, node)
        if node.tag not in _PLAIN_TAGS:
            doc.errors.append(ConfigError(_mark(doc.file, node), f"YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')!r} "
                                          "is not allowed: channel files hold plain values, lists and mappings"))
            return None
        if id(node) in self._open or len(path) > _MAX_DEPTH:
            doc.errors.append(ConfigError(_mark(doc.file, node), "a YAML alias that contains itself (or nesting "
                                          f"deeper than {_MAX_DEPTH} levels)"))
            return None
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            self._open.add(id(node))
            try:
                return self._build_collection(node, path)
            finally:
                self._open.discard(id(node))
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            doc.errors.append(ConfigError(_mark(doc.file, node), f"cannot read {node.value!r} as "
                                          f"{node.tag.replace('tag:yaml.org,2002:', '')}: {getattr(exc, 'problem', None) or exc}"))
            return None
        if isinstance(value, str) and "${" in value:
            value = self.substitute(value, path)
        return value

    def _build_collection(self, node, path: tuple):
        doc = self.doc
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                try:
                    key = (self.constructor.construct_object(key_node, deep=True)
                           if isinstance(key_node, yaml.ScalarNode) and key_node.tag in _PLAIN_TAGS else None)
                except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError):
                    key = None
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    doc.errors.append(ConfigError(_mark(doc.file, key_node), "keys must be plain names"))
                    continue
                key = str(key)
                if key in result:
                    doc.errors.append(ConfigError(_mark(doc.file, key_node), f"duplicate key {key!r}"))
                    continue
                doc.key_marks[path + (key,)] = _mark(doc.file, key_node)
                result[key] = self.build(value_node, path + (key,))
            return result
        return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]

    def substitute(self, value: str, path: tuple) -> str:
        def replace(match):
            self.doc.substituted.add(path)
            name, default = match.group("name"), match.group("default")
            if name.startswith("secret:"):
                return self.secret(name[7:].strip(), path)
            if name.startswith("env:"):
                name = name[4:]
            if name.startswith("file:"):
                target = Path(os.path.expanduser(name[5:].strip()))
                target = target if target.is_absolute() else self.base / target
                try:
                    secret = target.read_text(encoding="utf-8").strip()
                except OSError as exc:
                    self.doc.error(path, f"cannot read {target}: {exc.strerror}")
                    return ""
                self.doc.secrets.add(secret)
                return secret
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            where = "" if not _environment_name else f" in environment {_environment_name}" + (
                "" if isinstance(self.environ, _OnlyEnvironment) else " or the process's variables")
            self.doc.error(path, f"environment variable {name} is not set{where} (write ${{{name}:-default}} for a default)")
            return ""

        return _VARIABLE.sub(replace, value)

    def secret(self, name: str, path: tuple) -> str:
        if _secret_resolver is None:
            self.doc.error(path, f"${{secret:{name}}}: no vault here (hl7relay's commands read it from the store)")
            return ""
        try:
            value = _secret_resolver(name)
        except Exception as exc:  # noqa: BLE001 - a vault problem is this value's config error, said once
            self.doc.error(path, f"${{secret:{name}}}: {exc}")
            return ""
        if value is None:
            self.doc.error(path, f"no secret {name!r} in the vault (hl7relay secret set {name})")
            return ""
        self.doc.secrets.add(value)
        return value


def load_document(path: str | Path, environ=None, display_name: str | None = None) -> Document:
    """Read one YAML file; syntax errors come back in ``errors`` with their position."""
    path = Path(path)
    name = display_name or str(path)
    doc = Document(name, None)
    try:
        text = read_config_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        doc.errors.append(ConfigError(Mark(name, 1, 1), f"cannot read: {getattr(exc, 'strerror', None) or exc}"))
        return doc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Mark(name, mark.line + 1, mark.column + 1) if mark else Mark(name, 1, 1)
        problem = f"YAML syntax: {exc.problem or exc.context}"
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        if "{" in line and re.search(r"\b[A-Z][A-Z0-9]{2}(\[[^\]]*\])?[-.]\d+(\[[^\]]*\])?", line) and "[" in line:
            # `{path: OBX[1]-3.1}`: inside { } a [ starts a list (and * an alias) for YAML
            problem += " (quote paths that contain [ ] inside { }: path: \"OBX[*]-3.1\")"
        doc.errors.append(ConfigError(where, problem))
        return doc
    if node is None:
        doc.errors.append(ConfigError(Mark(name, 1, 1), "the file is empty"))
        return doc
    if environ is None:
        environ = {**os.environ, **_environment} if _environment_name else os.environ
    elif environ is ONLY_ENVIRONMENT:
        environ = _OnlyEnvironment(_environment)  # lint --all-envs: nothing of the shell's leaks in
    doc.data = _Builder(doc, environ, path.parent).build(node, ())
    return doc
