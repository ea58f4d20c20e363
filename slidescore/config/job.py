"""The whole job config: :class:`JobConfig` (every section), built from plain data by the strict typed
builder (:func:`_build`/:func:`_coerce`: unknown keys and wrongly typed values are refused with the
dotted key), validated, round-tripped through ``to_dict``, and :func:`load_config`, which reads a
YAML file with the project's one YAML reader.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidescore.config.samples import SamplesConfig
from slidescore.config.sections import (
    BlendingConfig,
    ClusterConfig,
    DecisionConfig,
    InputConfig,
    LimitsConfig,
    MaskConfig,
    ModelConfig,
    OutputConfig,
    RegionsConfig,
    ReportConfig,
    TilingConfig,
)
from slidescore.config.yaml_io import load_yaml_file
from slidescore.errors import ConfigError


@dataclass(frozen=True)
class JobConfig:
    """The whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    blending: BlendingConfig = field(default_factory=BlendingConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def validate(self) -> JobConfig:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> JobConfig:
        """Build and validate a config from plain data (``None``: all defaults)."""
        return _build(cls, {} if data is None else data, "").validate()

    def replace(self, **sections: dict[str, Any]) -> JobConfig:
        """A copy with some keys of some sections changed, e.g. ``replace(output={"uri": d})``."""
        d = self.to_dict()
        for section, values in sections.items():
            if section not in d:
                raise ConfigError(f"{section}: unknown section; known sections are {sorted(d)}")
            d[section].update(values)
        return JobConfig.from_dict(d)


def load_config(path: str | Path | None) -> JobConfig:
    """Read a YAML job config (``None`` → all defaults) with :func:`load_yaml_file`."""
    if path is None:
        return JobConfig().validate()
    p = Path(path)
    data = load_yaml_file(p, what="config file")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top, got {type(data).__name__}")
    return JobConfig.from_dict(data)


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=repr)  # keys need not be strings (YAML `1: x`)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key; {where} accepts {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r} (.nan and .inf are not settings; "
                              "remove the key for the default)")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj
