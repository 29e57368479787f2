"""The refactoring guard: fixed-seed fingerprints are reproducible and a change is caught."""

import json

import pytest

from experiments import behaviour_hash as bh


@pytest.mark.slow  # a refactoring tool; its digest and input checks stay in the default suite
def test_hashes_repeat_and_a_change_is_reported(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert bh.main(["--cases", "vdn", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["cases"]) == {"vdn"} and len(saved["cases"]["vdn"]["params"]) == 64
    # the same run again: the same numbers
    assert bh.main(["--cases", "vdn", "--check", str(out)]) == 0
    assert "same" in capsys.readouterr().out
    saved["cases"]["vdn"]["params"] = "0" * 64
    out.write_text(json.dumps(saved))
    assert bh.main(["--cases", "vdn", "--check", str(out)]) == 1
    assert "vdn" in capsys.readouterr().err


def test_digest_sees_values_shapes_and_order():
    import numpy as np

    a = {"x": np.zeros((2, 3), np.float32), "y": np.arange(3)}
    assert bh.digest(a) == bh.digest({"x": np.zeros((2, 3)), "y": np.arange(3)})
    assert bh.digest(a) != bh.digest({"x": np.zeros((3, 2)), "y": np.arange(3)})
    assert bh.digest(a) != bh.digest({"x": np.zeros((2, 3)), "y": np.arange(3)[::-1]})


def test_unknown_case_is_refused_naming_the_field(capsys):
    assert bh.main(["--cases", "nope"]) == 2
    assert "cases" in capsys.readouterr().err
