"""Run configuration: one YAML file → frozen dataclasses, validated before any work starts.

``load_config(path)`` reads the YAML with :func:`load_yaml_file`, the one strict, bounded YAML
reader of the project (duplicate keys, alias bombs, oversize files and several documents are
refused), and builds a :class:`JobConfig`. Unknown keys and bad values (NaN and infinities
included) raise :class:`~slidescore.errors.ConfigError` naming the dotted key, what was expected
and what was found. Configs are plain data (they pickle), hold no secrets (endpoints and
credentials come from the environment) and round-trip through ``to_dict``. Sample manifests,
the job's and the intake poller's, are read by one parser, :func:`parse_manifest`.

The package, by responsibility: :mod:`~slidescore.config.yaml_io` (the strict, bounded YAML
reader), :mod:`~slidescore.config.samples` (sample ids, ``samples``, manifests),
:mod:`~slidescore.config.sections` (the other sections and their value checks) and
:mod:`~slidescore.config.job` (:class:`JobConfig`, ``load_config``). Every name is importable from here.
"""

from slidescore.config.job import JobConfig, load_config
from slidescore.config.job import _build as _build
from slidescore.config.job import _coerce as _coerce
from slidescore.config.job import _to_plain as _to_plain
from slidescore.config.samples import (
    SAMPLE_ID_PATTERN,
    SamplesConfig,
    SampleSpec,
    check_sample_id,
    parse_manifest,
)
from slidescore.config.samples import _read_manifest as _read_manifest
from slidescore.config.sections import (
    CONVERSION_DTYPES,
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
    check_conversion,
)
from slidescore.config.sections import _number as _number
from slidescore.config.sections import _one_of as _one_of
from slidescore.config.sections import _positive_int as _positive_int
from slidescore.config.yaml_io import (
    MAX_YAML_ALIASES,
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    load_yaml_file,
    load_yaml_text,
)
from slidescore.config.yaml_io import _at as _at
from slidescore.config.yaml_io import _BoundedLoader as _BoundedLoader
from slidescore.config.yaml_io import _check_graph as _check_graph
from slidescore.config.yaml_io import _check_keys as _check_keys
from slidescore.config.yaml_io import _dotted as _dotted
from slidescore.config.yaml_io import _single_node as _single_node

__all__ = [
    "BlendingConfig",
    "CONVERSION_DTYPES",
    "ClusterConfig",
    "DecisionConfig",
    "InputConfig",
    "JobConfig",
    "LimitsConfig",
    "MAX_YAML_ALIASES",
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "MaskConfig",
    "ModelConfig",
    "OutputConfig",
    "RegionsConfig",
    "ReportConfig",
    "SAMPLE_ID_PATTERN",
    "SampleSpec",
    "SamplesConfig",
    "TilingConfig",
    "check_conversion",
    "check_sample_id",
    "load_config",
    "load_yaml_file",
    "load_yaml_text",
    "parse_manifest",
]
