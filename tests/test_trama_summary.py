"""The TRAMA study's summary from synthetic runs: engagement per seed and the paired comparison."""

import json

import numpy as np
import pytest

from experiments.studies import trama_summary as ts


def _write(run, seeds, iterations, ret, extra=None):
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for it in range(1, iterations + 1):
            for s in range(seeds):
                row = {
                    "iteration": it,
                    "env_steps": 512 * it,
                    "seed": s,
                    "episodes": 10,
                    "return": ret(s, it),
                    "win_rate": 0.0,
                }
                row.update(extra(s, it) if extra else {})
                f.write(json.dumps(row) + "\n")


def test_summary_reads_engagement_and_pairs_seeds(tmp_path, capsys):
    def clusters(s, it):
        on = float(it >= 4)
        return {
            "clustered": on,
            "cluster_ari": 0.8 * on + 0.05 * s,
            "class_accuracy": 0.9 * on,
            "class_majority_rate": 0.4 * on,
            "codes_in_use": 100.0,
            "clusterings": float(it >= 4) + (it >= 8),
            "cluster_size_0": 0.5,
            "cluster_size_1": 0.5,
        }

    _write(tmp_path / "A_trama", 3, 10, lambda s, it: 1.0 + s, clusters)
    _write(tmp_path / "A_qplex", 3, 12, lambda s, it: 0.5 + s)  # longer: cut to the common 10 iterations
    assert ts.main([str(tmp_path), "--sets", "A", "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "summary.json").read_text())[0]
    assert r["iterations"] == 10 and r["seeds"] == 3
    e = r["engagement"]
    np.testing.assert_allclose(e["cluster_ari"], [0.8, 0.85, 0.9])
    assert e["first_clustering_env_steps"] == [2048.0] * 3 and e["clusterings"] == [2.0] * 3
    d = r["return"]["final"]["diff_mean"]
    assert d["value"] == pytest.approx(0.5) and d["ci95"] == pytest.approx([0.5, 0.5])
    assert "| 0 | 2,048 | 2 | 0.800 |" in (tmp_path / "out" / "summary.md").read_text()


def test_missing_runs_are_named(tmp_path, capsys):
    assert ts.main([str(tmp_path), "--sets", "B"]) == 2
    assert "B_trama" in capsys.readouterr().err
