"""The typed summary contract: a summary.json that is not one is a one-line DataError, never a
KeyError deep inside the CLI or the report."""

from __future__ import annotations

import json

import pytest

from kdsec.errors import DataError
from kdsec.summary import SCHEMA_VERSION, Summary, read_summary


def test_a_file_that_is_not_a_summary_is_a_one_line_error(tmp_path):
    broken = tmp_path / "summary.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="is not a kdsec summary.json") as caught:
        read_summary(broken)
    assert "\n" not in str(caught.value)

    broken.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "run_id": "abc", "verdict": "pass"}))
    with pytest.raises(DataError, match="is not a kdsec summary.json of schema") as caught:
        read_summary(broken)
    assert "\n" not in str(caught.value)


def test_a_linked_or_missing_summary_is_refused(tmp_path):
    with pytest.raises(DataError, match="is missing"):
        read_summary(tmp_path / "summary.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "summary.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(DataError, match="symbolic link"):
        read_summary(tmp_path / "summary.json")


def test_unknown_top_level_keys_are_rejected():
    """The top level is exact (a renamed key is caught); sections keep their extra detail."""
    assert Summary.model_config["extra"] == "forbid"
    with pytest.raises(ValueError, match="surprise"):
        Summary.model_validate({"surprise": 1})


def test_strict_json_writes_null_for_what_is_not_a_number():
    from kdsec.fileio import strict_json

    text = strict_json({"bins": [0.5, float("nan")], "inf": float("-inf"), "nested": [{"x": float("nan")}]})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON")) == {
        "bins": [0.5, None], "inf": None, "nested": [{"x": None}]}
