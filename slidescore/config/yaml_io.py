"""The one YAML reader of the project: strict (duplicate keys, explicit tags and several documents are
refused) and bounded (file size, aliases, expanded size and depth), so a hostile or mistaken config
fails with a :class:`~slidescore.errors.ConfigError` before it can exhaust memory or time.
:func:`load_yaml_text` parses text, :func:`load_yaml_file` reads a file (job config, intake config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slidescore.errors import ConfigError

# -- the one YAML reader ------------------------------------------------------------------------
# Limits far above any real config (a job or intake YAML is a few kB, uses a handful of anchors at
# most) and far below what could exhaust an unattended poller's memory or time.
MAX_YAML_BYTES = 1 << 20


MAX_YAML_ALIASES = 100


MAX_YAML_NODES = 100_000  # nodes of the document with every alias expanded


MAX_YAML_DEPTH = 64  # nesting of collections, aliases expanded


class _BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]
    """``SafeLoader`` that counts aliases and nesting while composing, before anything is built."""

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self.where = where
        self.n_aliases = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        # explicit tags (!!int x, !!binary, !custom) are never needed in a config, and PyYAML's
        # constructors for them let builtin errors through on malformed values
        if getattr(event, "tag", None) not in (None, "!"):
            raise ConfigError(f"{self.where}: explicit YAML tag {event.tag!r} at line {event.start_mark.line + 1}; a config "
                              "takes plain values: remove the tag (quote the value to make it a string)")
        if self.check_event(yaml.AliasEvent):
            self.n_aliases += 1
            if self.n_aliases > MAX_YAML_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.where}: more than {MAX_YAML_ALIASES} aliases (*name), the last "
                                  f"at line {line}; a config needs few: write the values out")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.where}: nested more than {MAX_YAML_DEPTH} levels deep (line {line}); "
                                  "a config is a few levels of sections and lists")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml_text(text: str, where: str) -> Any:
    """Parse one YAML document strictly and within bounds: the project's only YAML reader.

    Parameters
    ----------
    text
        The YAML text.
    where
        What it is, starting every message, e.g. ``config file 'job.yaml'``.

    Returns
    -------
    Any
        The document as plain data (``None`` for an empty document), as ``yaml.safe_load`` builds it.

    Raises
    ------
    ConfigError
        Text over :data:`MAX_YAML_BYTES` (checked before parsing); not valid YAML; more than one
        document; a mapping key given twice at any depth (the message names the key and both
        lines); more than :data:`MAX_YAML_ALIASES` aliases, or a document whose size with aliases
        expanded exceeds :data:`MAX_YAML_NODES` nodes or :data:`MAX_YAML_DEPTH` levels, or an
        alias inside its own anchor (all found on the composed node graph, before anything is
        expanded in memory).
    """
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    if n_bytes > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {n_bytes} bytes, over the limit of {MAX_YAML_BYTES} bytes (1 MiB) for a YAML "
                          "config; is it the right file?")
    try:
        loader = _BoundedLoader(text, where)  # the reader refuses control characters here already
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    try:
        node = _single_node(loader, where)
        if node is None:
            return None
        _check_graph(node, loader, where)
        return loader.construct_document(node)
    except ConfigError:
        raise
    # PyYAML's constructors let builtin errors through for malformed values: the implicit date
    # 2026-13-01 or an int of 5000 digits (ValueError); and, were explicit tags not refused while
    # composing, `!!int x` (ValueError), `!!int ''` (IndexError), `!!bool x` (KeyError), `!!timestamp x`
    # (AttributeError)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        detail = str(e) if isinstance(e, yaml.YAMLError) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{where} is not valid YAML: {detail}") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """Read a YAML file with :func:`load_yaml_text`, refusing one over 1 MiB before reading it all.

    Parameters
    ----------
    path
        The file.
    what
        What it is, for messages (``config file``, ``intake config``).

    Returns
    -------
    Any
        The document as plain data (``None`` for an empty file).

    Raises
    ------
    ConfigError
        Missing, unreadable, not UTF-8, too large, or refused by :func:`load_yaml_text`.
    """
    p = Path(path)
    where = f"{what} {str(p)!r}"
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # never more, whatever the file is (a FIFO, /dev/zero)
    except FileNotFoundError:
        raise ConfigError(f"{where} not found; pass an existing YAML file to --config") from None
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({type(e).__name__}: {e}); pass a readable YAML file") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: larger than the limit of {MAX_YAML_BYTES} bytes (1 MiB) for a YAML config; "
                          "is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text ({e}); save it as UTF-8") from None
    return load_yaml_text(text, where)


def _single_node(loader: Any, where: str) -> Any:
    """The composed node of the only document (``None`` if there is none); refuses a second one."""
    loader.get_event()  # StreamStartEvent
    node = loader.compose_document() if not loader.check_event(yaml.StreamEndEvent) else None
    if not loader.check_event(yaml.StreamEndEvent):
        line = loader.peek_event().start_mark.line + 1
        raise ConfigError(f"{where}: a second YAML document starts at line {line}; expected one document: remove "
                          "the '---' line and what follows, or merge the two")
    return node


def _check_graph(root: Any, loader: Any, where: str) -> None:
    """Refuse duplicate keys, recursive aliases and documents too large or deep once aliases are
    expanded, walking the composed graph once (each node's expanded size is memoised, so a
    billion-laughs document costs its written size, not its expanded one)."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, str, bool]] = [(root, "", False)]
    while stack:
        node, path, finished = stack.pop()
        nid = id(node)
        kids: list[tuple[Any, str]] = []
        if isinstance(node, yaml.MappingNode):
            kids = [(k, path) for k, _ in node.value]
            kids += [(v, _dotted(path, k)) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            kids = [(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
        if finished:
            open_.discard(nid)
            size[nid] = 1 + sum(size[id(k)] for k, _ in kids)
            height[nid] = 1 + max((height[id(k)] for k, _ in kids), default=0)
            if size[nid] > MAX_YAML_NODES:
                raise ConfigError(f"{where}: {_at(path)} expands to more than {MAX_YAML_NODES} values through its "
                                  "aliases (*name); refused (a config is small: write the values out)")
            if height[nid] > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: {_at(path)} is nested more than {MAX_YAML_DEPTH} levels deep once its "
                                  "aliases (*name) are expanded; refused")
            continue
        if nid in size:
            continue
        if nid in open_:
            raise ConfigError(f"{where}: {_at(path)} (line {node.start_mark.line + 1}) refers to itself through an "
                              "alias (*name) inside its own anchor; a config cannot be recursive")
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, loader, where, path)
        open_.add(nid)
        stack.append((node, path, True))
        stack.extend((k, p, False) for k, p in reversed(kids))


def _check_keys(node: Any, loader: Any, where: str, path: str) -> None:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # a list or mapping as a key: the constructor refuses it (unhashable)
        # `<<` (merge) and `=` (value) keys have no scalar constructor: compare them as written
        special = key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")
        key = key_node.value if special else loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"{where}: key {_dotted(path, key_node)!r} appears twice (lines {lines[key]} and "
                              f"{line}); keep one")
        lines[key] = line


def _dotted(path: str, key_node: Any) -> str:
    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
    return f"{path}.{name}" if path else str(name)


def _at(path: str) -> str:
    return f"key {path!r}" if path else "the document"
