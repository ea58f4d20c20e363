"""Fuzzing the model card reader: whatever a card file holds, reading it gives a card or a ModelLoadError.

Bounded (a fixed number of examples, derandomised) so it runs in CI; mutations start from the
shipped built-in card, so they reach the deep checks (calibration, operating points, colours) and
not only the top-level type check.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slidescore.errors import ModelLoadError
from slidescore.model.card import ModelCard
from slidescore.model.loading import _read_card, builtin_dir

BASE: dict[str, Any] = json.loads((builtin_dir("smearnet") / "card.json").read_text())
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.lists(st.floats(allow_nan=True), max_size=4), st.dictionaries(st.text(max_size=6),
                                                                                                       st.integers(), max_size=3))


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _paths(v, (*prefix, i))
    return out


PATHS = [p for p in _paths(BASE) if p]


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    obj = copy.deepcopy(obj)
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    if value is _DELETE:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return obj


_DELETE = object()


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(LEAVES, st.just(_DELETE))), min_size=1, max_size=3))
def test_mutated_cards_give_a_card_or_a_model_load_error(tmp_path_factory, edits: list[tuple[tuple[Any, ...], Any]]) -> None:
    data: Any = BASE
    for path, value in edits:
        try:
            data = _set(data, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # the path vanished with an earlier edit
    folder = tmp_path_factory.mktemp("card")
    card_file = Path(folder) / "card.json"
    card_file.write_text(json.dumps(data, allow_nan=True))
    try:
        card = _read_card(card_file)
    except ModelLoadError as e:
        assert str(card_file) in str(e)  # names the file it refuses
        return
    assert isinstance(card, ModelCard) and card.n_classes >= 1 and card.patch_px > 0


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12))
def test_arbitrary_json_gives_a_model_load_error(tmp_path_factory, data: Any) -> None:
    card_file = Path(tmp_path_factory.mktemp("card")) / "card.json"
    card_file.write_text(json.dumps(data, allow_nan=True))
    try:
        _read_card(card_file)
    except ModelLoadError:
        return
    raise AssertionError(f"accepted a card built from random JSON: {data!r}")
