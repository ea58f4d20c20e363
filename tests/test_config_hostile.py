"""Hostile and malformed configs: every YAML the project reads goes through one strict, bounded
reader (duplicate keys, alias bombs, oversize files, several documents), and every float setting
refuses NaN and infinities. Whatever the input, the outcome is a ConfigError or a valid config."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slidescore.config import (
    MAX_YAML_BYTES,
    ClusterConfig,
    JobConfig,
    MaskConfig,
    load_config,
    load_yaml_file,
    load_yaml_text,
)
from slidescore.errors import ConfigError
from slidescore.intake import load_intake_config
from tests.conftest import REPO

SECTIONS: dict[str, type] = typing.get_type_hints(JobConfig)
FIELDS: dict[str, dict[str, Any]] = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
FLOAT_FIELDS = [(s, f) for s, hints in FIELDS.items() for f, tp in hints.items()
                if tp in (float, float | None) or tp in (tuple[float, ...], tuple[float, ...] | None)]


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _floats(cfg: JobConfig) -> list[float]:
    out: list[float] = []
    for section, field in FLOAT_FIELDS:
        v = getattr(getattr(cfg, section), field)
        out += list(v) if isinstance(v, tuple) else [] if v is None else [v]
    return out


def _load_text(text: str) -> JobConfig | None:
    """The ``load_config`` path on text: strict YAML, then ``JobConfig.from_dict``; ``None`` when
    the text is refused (a ConfigError) or is not a mapping (``load_config`` refuses that)."""
    try:
        data = load_yaml_text(text, "fuzz.yaml")
    except ConfigError:
        return None
    if data is not None and not isinstance(data, dict):
        return None
    return _build(data)


def _build(data: Any) -> JobConfig | None:
    try:
        cfg = JobConfig.from_dict(data)
    except ConfigError:
        return None
    assert all(math.isfinite(v) for v in _floats(cfg)), cfg
    assert JobConfig.from_dict(cfg.to_dict()) == cfg
    return cfg


# -- fuzz ------------------------------------------------------------------------------------------
YAML_BITS = [
    "\n", "\n", " ", "  ", ": ", ":", "- ", "-", ",", "[", "]", "{", "}", "? ", "'", '"', "|", ">", "#", "---\n", "...\n",
    "&a ", "*a", "&b ", "*b", "<<: ", "!!int ", "!!float ", "!!bool ", "!!str ", "!!timestamp ", "!!binary ", "!!set ",
    "!!omap ", "!!python/object/apply:os.system ", "!custom ", "%YAML 1.1\n", ".nan", ".inf", "-.inf", "nan", "1", "0", "-3",
    "1.5", "1e400", "0x1f", "2026-13-01", "2026-01-01 00:00:00+99:00", "null", "~", "true", "yes", "=", "\t", "\ufeff",
    *SECTIONS, *sorted({f for hints in FIELDS.values() for f in hints}),
]
NAMES = [*SECTIONS, *sorted({f for hints in FIELDS.values() for f in hints})]
printable = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=6)
token_soup = st.lists(st.sampled_from(YAML_BITS) | printable, max_size=40).map("".join)
# lines shaped like a config (indent, key, separator, value tokens) reach the sections' checks
yaml_line = st.tuples(st.sampled_from(["", "", "  ", "    ", "- ", "  - "]), st.sampled_from(NAMES) | printable,
                      st.sampled_from([": ", ": ", ":", " "]),
                      st.lists(st.sampled_from(YAML_BITS[:60]) | printable, max_size=3).map("".join)).map("".join)
yaml_ish = st.lists(yaml_line, max_size=12).map("\n".join) | token_soup | st.text(max_size=200)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=yaml_ish)
def test_random_yaml_gives_a_config_error_or_a_valid_config(text: str) -> None:
    _load_text(text)


scalars = (st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.integers() | st.floats() | st.text(max_size=8)
           | st.sampled_from(["auto", "cpu", "cuda:0", "gaussian", "brightfield", "nodata", "float32", "uint8", "s3://b/a.tif"]))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["low", "high", "uint16", "gray_to_rgb", "s1"]) | st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _section(name: str) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(sorted(FIELDS[name])) | st.text(max_size=5)
    return st.none() | st.dictionaries(keys, values, max_size=4) | values


configs = st.dictionaries(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=5) | st.integers(), st.none(), max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({k: _section(k) if k in SECTIONS else values for k in d}))


@settings(max_examples=200, deadline=None)
@given(data=configs)
def test_random_nested_dicts_give_a_config_error_or_a_valid_config(data: dict[Any, Any]) -> None:
    _build(data)


# -- duplicate keys --------------------------------------------------------------------------------
def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    text = "model:\n  name: builtin:smearnet\ntiling:\n  stride_px: 16\nmask:\n  mask_mpp: 2.0\n\n\ntiling:\n  chunk_cells: 64\n"
    with pytest.raises(ConfigError, match=r"^config file '.*job.yaml': key 'tiling' appears twice \(lines 3 and 9\); keep one$"):
        load_config(_write(tmp_path, text))
    nested = "mask:\n  mask_mpp: 2.0\n  method: none\n  mask_mpp: 8.0\n"
    with pytest.raises(ConfigError, match=r"key 'mask.mask_mpp' appears twice \(lines 2 and 4\)"):
        load_config(_write(tmp_path, nested))
    flow = "samples: {groups: {s1: [a.tif], s1: [b.tif]}}\n"
    with pytest.raises(ConfigError, match=r"key 'samples.groups.s1' appears twice \(lines 1 and 1\)"):
        load_config(_write(tmp_path, flow))
    # one key spelled two ways is still one key
    with pytest.raises(ConfigError, match=r"key 'regions.0x1' appears twice \(lines 2 and 3\)"):
        load_yaml_text("regions:\n  1: a\n  0x1: b\n", "x")


def test_merge_keys_still_override_without_being_duplicates(tmp_path: Path) -> None:
    text = "base: &base {stride_px: 32, chunk_cells: 64}\n"
    assert load_yaml_text(text + "tiling:\n  <<: *base\n  stride_px: 8\n", "x")["tiling"] == {"stride_px": 8, "chunk_cells": 64}
    with pytest.raises(ConfigError, match=r"key 'tiling.<<' appears twice \(lines 3 and 4\)"):
        load_yaml_text(text + "tiling:\n  <<: *base\n  <<: *base\n", "x")


def test_the_intake_config_is_read_by_the_same_strict_reader(tmp_path: Path) -> None:
    p = _write(tmp_path, "output: s3://out/\nintake_prefix: s3://in/\noutput: s3://other/\n", "intake.yaml")
    with pytest.raises(ConfigError, match=r"^intake config '.*intake.yaml': key 'output' appears twice \(lines 1 and 3\)"):
        load_intake_config(p)
    with pytest.raises(ConfigError, match="intake config .* a second YAML document"):
        load_intake_config(_write(tmp_path, "output: o\nintake_prefix: p\n---\noutput: o\n", "intake.yaml"))
    with pytest.raises(ConfigError, match="intake config .* not found"):
        load_intake_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="intake config: expected a mapping"):
        load_intake_config(_write(tmp_path, "- output\n", "intake.yaml"))


# -- alias bombs, recursion, depth -----------------------------------------------------------------
def _laughs(per_level: int, levels: int, use: str) -> str:
    """A billion-laughs document: each level lists the previous one ``per_level`` times."""
    lines = [f"l0: &l0 [{', '.join(['0.5'] * per_level)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * per_level)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n{use}*l{levels - 1}\n"


@pytest.mark.timeout(60)  # expanded, either bomb would run for hours and exhaust memory
@pytest.mark.parametrize(("per_level", "levels"), [(10, 9), (2, 48)])
def test_alias_bombs_are_refused_before_expansion(tmp_path: Path, per_level: int, levels: int) -> None:
    text = _laughs(per_level, levels, "regions:\n  thresholds: ")
    assert text.count("*") <= 100  # under the alias limit: the expansion bound has to catch it
    with pytest.raises(ConfigError, match=r"expands to more than 100000 values through its aliases"):
        load_config(_write(tmp_path, text))


def test_too_many_aliases_recursion_and_depth_are_refused() -> None:
    many = "a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n"
    with pytest.raises(ConfigError, match=r"^x: more than 100 aliases \(\*name\), the last at line 2"):
        load_yaml_text(many, "x")
    assert load_yaml_text(many.replace("101", "1").replace(", *a" * 100, ""), "x") == {"a": 1, "b": [1]}
    with pytest.raises(ConfigError, match="refers to itself through an alias"):
        load_yaml_text("tiling: &t {stride_px: *t}\n", "x")
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        load_yaml_text("a: " + "[" * 100_000 + "]" * 100_000, "x")
    with pytest.raises(ConfigError, match="nested more than 64 levels deep once its aliases"):
        load_yaml_text("a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n", "x")


# -- size, documents, shape ------------------------------------------------------------------------
def test_oversize_files_are_refused_before_parsing(tmp_path: Path) -> None:
    big = "tiling: {stride_px: 16}\n" + "#" * MAX_YAML_BYTES + "\n"
    with pytest.raises(ConfigError, match=r"larger than the limit of 1048576 bytes \(1 MiB\)"):
        load_config(_write(tmp_path, big))
    with pytest.raises(ConfigError, match=r"over the limit of 1048576 bytes \(1 MiB\)"):
        load_yaml_text(big, "x")
    # a "file" that never ends is read up to the limit only
    with pytest.raises(ConfigError, match="larger than the limit"):
        load_yaml_file("/dev/zero")


def test_several_documents_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"a second YAML document starts at line 3; expected one document"):
        load_config(_write(tmp_path, "tiling:\n  stride_px: 16\n---\ntiling:\n  stride_px: 32\n"))
    with pytest.raises(ConfigError, match="a second YAML document starts at line 2"):
        load_config(_write(tmp_path, "tiling: {}\n---\n"))
    cfg = load_config(_write(tmp_path, "---\ntiling: {stride_px: 32}\n...\n"))  # one explicit document is fine
    assert cfg.tiling.stride_px == 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- tiling\n- mask\n", "expected a mapping of sections at the top, got list"),
        ("just words\n", "expected a mapping of sections at the top, got str"),
        ("tiling: 3\n", "tiling: expected a mapping, got int"),
        ("mask: [1, 2]\n", "mask: expected a mapping, got list"),
        ("1: x\ntiling: {}\n", "1: unknown key"),
        ("a: 2026-13-01\n", "is not valid YAML: ValueError"),
        ("tiling: {stride_px: !!int x}\n", "explicit YAML tag 'tag:yaml.org,2002:int' at line 1; a config takes plain values"),
        ("tiling: {stride_px: !!int 16}\n", "explicit YAML tag"),
        ("tiling: !!timestamp x\n", "explicit YAML tag"),
        ("tiling: !!python/object/apply:os.system [echo hi]\n", "explicit YAML tag"),
        ("tiling: !custom {}\n", "explicit YAML tag '!custom'"),
        ("tiling: {stride_px: " + "9" * 5000 + "}\n", "is not valid YAML"),
        ("tiling: {stride_px: 16\n", "is not valid YAML"),
    ],
)
def test_malformed_documents_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_non_utf8_and_unreadable_files(tmp_path: Path) -> None:
    p = tmp_path / "job.yaml"
    p.write_bytes(b"tiling: {stride_px: 16}\n# \xff\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)  # a folder


# -- NaN, infinities, ranges -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [".nan", ".NaN", ".inf", "-.inf", "+.inf"])
@pytest.mark.parametrize("key", ["mask.mask_mpp", "regions.min_area_um2"])
def test_nan_and_inf_in_yaml_name_the_dotted_key(tmp_path: Path, key: str, bad: str) -> None:
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number, got (nan|inf|-inf)"):
        load_config(_write(tmp_path, f"{section}:\n  {field}: {bad}\n"))


@pytest.mark.parametrize("bad", ["nan", "inf", "NaN", "1e400"])
def test_strings_that_look_like_nan_are_not_numbers(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"^mask.mask_mpp: expected a number, got '{bad}'"):
        load_config(_write(tmp_path, f"mask:\n  mask_mpp: {bad}\n"))
    with pytest.raises(ConfigError, match="^mask.mask_mpp: expected a finite number"):
        JobConfig.from_dict({"mask": {"mask_mpp": 10**400}})  # an int too large for a float


def test_every_float_setting_refuses_nan_and_inf() -> None:
    assert len(FLOAT_FIELDS) >= 15  # every float setting of every section is covered
    for section, field in FLOAT_FIELDS:
        key = f"{section}.{field}"
        is_tuple = "tuple" in str(FIELDS[section][field])
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
                JobConfig.from_dict({section: {field: [bad] if is_tuple else bad}})
            # built directly (not from YAML), validation refuses it too, with the range it expects
            value = (bad,) if is_tuple else bad
            cfg = dataclasses.replace(JobConfig(), **{section: dataclasses.replace(getattr(JobConfig(), section), **{field: value})})
            with pytest.raises(ConfigError, match=rf"^{key}: expected .*, got .*(nan|inf)"):
                cfg.validate()


def test_direct_construction_names_the_expected_range() -> None:
    cfg = JobConfig(mask=MaskConfig(mask_mpp=math.nan))
    with pytest.raises(ConfigError, match=r"^mask.mask_mpp: expected a finite positive number \(µm/px\), got nan$"):
        cfg.validate()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"regions": {"min_area_um2": -1}}, "regions.min_area_um2: expected a finite number >= 0"),
        ({"mask": {"max_brightness": 1.5}}, r"mask.max_brightness: expected a fraction in \[0, 1\]"),
        ({"mask": {"min_saturation": -0.1}}, r"mask.min_saturation: expected a fraction in \[0, 1\]"),
        ({"blending": {"sigma_frac": 0}}, r"blending.sigma_frac: expected a number in \(0, 1\]"),
        ({"input": {"mpp_tolerance": 1}}, r"input.mpp_tolerance: expected a fraction in \[0, 1\)"),
        ({"input": {"conversion": {"uint16": {"low": 0, "high": math.inf}}}}, r"input.conversion.uint16: .*\(finite\)"),
        ({"decision": {"target_prevalence": [0.0]}}, r"decision.target_prevalence: expected fractions in \(0, 1\)"),
        ({"report": {"quality_mpp": 0}}, "report.quality_mpp: expected a finite positive"),
        ({"cluster": {"num_gpus_per_actor": -2}}, "cluster.num_gpus_per_actor: expected 0, a fraction"),
        ({"cluster": {"num_gpus_per_actor": 1.5}}, "cluster.num_gpus_per_actor: expected 0, a fraction"),
        ({"cluster": {"num_cpus_per_actor": -1}}, "cluster.num_cpus_per_actor: expected a finite number >= 0"),
        ({"cluster": {"actor_start_timeout_s": 0}}, "cluster.actor_start_timeout_s: expected a finite positive"),
    ],
)
def test_ranges(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        JobConfig.from_dict(data)


def test_edge_values_stay_valid() -> None:
    cfg = JobConfig.from_dict({"regions": {"min_area_um2": 0, "thresholds": [0, 1]}, "mask": {"min_foreground_frac": 0,
                               "max_brightness": 1, "nodata_value": -1}, "cluster": {"num_gpus_per_actor": 2, "num_cpus_per_actor": 0},
                               "blending": {"sigma_frac": 1}, "input": {"mpp": 500000}})
    assert cfg.cluster == ClusterConfig(num_gpus_per_actor=2.0, num_cpus_per_actor=0.0)
    assert cfg.regions.min_area_um2 == 0.0 and cfg.input.mpp == 500000.0


@pytest.mark.parametrize("where", ["k8s/base/config", "k8s/overlays/example/config"])
def test_deployed_job_configs_load(where: str) -> None:
    assert load_config(REPO / where / "job.yaml") == JobConfig.from_dict(load_config(REPO / where / "job.yaml").to_dict())
