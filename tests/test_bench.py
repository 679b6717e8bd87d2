"""The benchmark's protocol helpers (validation/bench.py, shared by validation/bench_gpu.py):
rotating order, one timing per contender and round, medians and ratios to the baseline."""
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "validation"))
import bench  # noqa: E402


def test_time_rounds_rotates_the_contenders():
    calls = []
    contenders = {("W1", "float64"): {c: (lambda c=c: calls.append(c)) for c in "abc"}}
    args = SimpleNamespace(gap=0.0, warmup=0.0, min_time=0.0)
    times = bench.time_rounds(contenders, args, range(3))
    assert calls == list("abc" "bca" "cab")             # one call each (warm-up 0: no repeat)
    assert {c: len(ts) for c, ts in times[("W1", "float64")].items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times[("W1", "float64")].values() for t in ts)


def test_summary_rows_medians_and_ratios():
    times = {("W1", "float32"): {"torch": [0.004, 0.002, 0.003], "x": [0.001, 0.0015, 0.09]}}
    rows = {r["contender"]: r for r in bench.summary_rows(times, {"float32": 100.0}, "torch")}
    kw, B, K1, K2 = bench.WORKLOADS["W1"]
    assert rows["torch"]["ms_per_step"] == pytest.approx(3.0)
    assert rows["x"]["ms_per_step"] == pytest.approx(1.5)   # the median: one slow round is ignored
    assert rows["x"]["ratio_to_torch"] == pytest.approx(0.5)
    assert rows["torch"]["ratio_to_torch"] == pytest.approx(1.0)
    assert rows["x"]["tokens_per_s"] == pytest.approx(K2 * B / 0.0015)
    assert rows["x"]["gflops"] == pytest.approx(bench.model_flops("W1") / 0.0015 / 1e9)
    assert rows["x"]["fraction_of_peak"] == pytest.approx(rows["x"]["gflops"] / 100.0)
    assert rows["x"]["rounds"] == 3
    assert rows["x"]["ms_rounds"] == pytest.approx([1.0, 1.5, 90.0])
    # per round 0.001/0.004, 0.0015/0.002, 0.09/0.003: 0.25, 0.75, 30
    assert rows["x"]["paired_ratio"] == pytest.approx(0.75)
    assert rows["x"]["paired_ratio_iqr"] == pytest.approx([0.5, 15.375])
    assert rows["torch"]["paired_ratio"] == pytest.approx(1.0)


def test_split_lists_names_the_bad_value():
    args = SimpleNamespace(workloads="W1,W3", dtypes="float32")
    bench.split_lists(args)
    assert args.workloads == ["W1", "W3"] and args.dtypes == ["float32"]
    with pytest.raises(ValueError, match="--workloads.*'W9'"):
        bench.split_lists(SimpleNamespace(workloads="W1,W9", dtypes="float64"))
    with pytest.raises(ValueError, match="--dtypes.*'float16'"):
        bench.split_lists(SimpleNamespace(workloads="W1", dtypes="float16"))


def test_probe_flops_count_no_weight_gradients():
    """W3's count (the probe) has no weight-gradient products: less than W1's over as many steps."""
    kw, B, K1, _ = bench.WORKLOADS["W3"]
    assert np.isfinite(bench.model_flops("W3")) and bench.model_flops("W3") > 0
    H, L, E = kw["hidden_size"], kw["num_layers"], kw["input_size"]
    fwd = sum(2 * B * (i + H) * 4 * H for i in [E] + [H] * (L - 1)) * (K1 + 1)
    assert bench.model_flops("W3") < 3 * fwd
