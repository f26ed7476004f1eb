"""The JSON writer every module shares: its format, its options, and that it is atomic."""

import json

import numpy as np
import pytest

from crosscoders.errors import DataError
from crosscoders.io import read_json, write_json


def test_write_json_is_indented_with_a_trailing_newline_and_reads_back(tmp_path):
    path = tmp_path / "new" / "summary.json"  # the folder is created
    write_json(path, {"a": [1, 2], "b": {"c": None}})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": {"c": None}}, indent=2) + "\n"
    assert read_json(path) == {"a": [1, 2], "b": {"c": None}}


def test_write_json_passes_options_to_dumps_and_indent_can_be_changed(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"n": np.int64(3), "t": "é"}, indent=None, default=int, ensure_ascii=False)
    assert path.read_text() == '{"n": 3, "t": "é"}\n'


def test_a_value_json_cannot_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"old": 1})
    with pytest.raises(TypeError):
        write_json(path, {"new": object()})
    assert read_json(path) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_read_json_names_a_damaged_file_and_the_fix(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"cut short')
    with pytest.raises(DataError, match=r"x.json could not be read as JSON .*; write it again"):
        read_json(path, fix="write it again")
