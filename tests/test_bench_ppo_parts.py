from experiments import bench_ppo_parts


def test_ppo_parts_bench_times_rollout_learner_and_update(tmp_path):
    """At tiny sizes the bench times all three pieces and writes its rows."""
    out = tmp_path / "parts.json"
    args = bench_ppo_parts.Args(algos=("ippo",), num_envs=4, num_steps=8, repeats=1, one_row_vmap=True, out=str(out))
    (row,) = bench_ppo_parts.main(args)
    assert row["rollout_s"] > 0 and row["learner_s"] > 0 and row["update_s"] > 0
    assert 0 < row["learner_share"] < 2
    assert out.exists()
    assert row["update_vmap1_s"] > 0 and row["rollout_vmap1_cost"] > -1
