"""The shared timing helper: warm-up runs are not counted, the two runs alternate, medians and spreads, noise."""
import pytest

from attnproc.workflows.timing import compare_runs, measure_runs


def _runner(name, log, times):
    """A fake render that logs its call and reports the next of ``times`` (total) and half of it (attention)."""
    it = iter(times)

    def run():
        t = next(it)
        log.append(name)
        return {"total_s": t, "attention_s": t / 2, "attention_calls": 4, "frames": name}
    return run


def test_warm_up_then_alternate_and_take_medians():
    log = []
    fast = _runner("m", log, [9.0, 1.0, 1.2, 0.9])  # first (warm-up) call is slow: a cold start
    slow = _runner("r", log, [9.0, 2.0, 2.2, 2.1])
    last, ref, report = compare_runs(fast, slow, repeats=3, names=("m", "r"))
    assert log == ["r", "m", "m", "r", "r", "m", "m", "r"]  # warm-up both, then m-first, r-first, m-first
    assert last["frames"] == "m" and ref["frames"] == "r"
    assert report["m"]["total_s"] == {"median": 1.0, "min": 0.9, "max": 1.2, "runs": [1.0, 1.2, 0.9]}
    assert report["m"]["attention_s"]["median"] == 0.5 and report["m"]["attention_calls"] == 4
    assert report["speedup"]["total"]["runs"] == [2.0, pytest.approx(2.2 / 1.2, abs=1e-6), pytest.approx(2.1 / 0.9, abs=1e-6)]
    assert report["speedup"]["total"]["median"] == 2.0 and report["within_noise"] is False
    assert report["verdict"] == "m: 2.00x the speed of r (median of 3 alternating warm runs, range 1.83-2.33x)"


def test_overlapping_runs_are_within_noise_and_one_run_cannot_tell():
    log = []
    _, _, report = compare_runs(_runner("m", log, [5, 1.0, 1.3]), _runner("r", log, [5, 1.2, 1.1]), repeats=2)
    assert report["within_noise"] is True and "no difference beyond noise" in report["verdict"]
    _, _, single = compare_runs(_runner("m", [], [5, 1.0]), _runner("r", [], [5, 2.0]), repeats=1)
    assert single["within_noise"] is None and "cannot tell noise" in single["verdict"]


def test_measure_runs_and_bad_counts():
    log = []
    last, timings = measure_runs(_runner("m", log, [7.0, 1.0, 3.0]), repeats=2, warmup=1)
    assert log == ["m"] * 3 and timings["total_s"]["runs"] == [1.0, 3.0] and timings["total_s"]["median"] == 2.0
    with pytest.raises(ValueError, match="repeats: must be an integer >= 1, got 0"):
        measure_runs(_runner("m", [], [1.0]), repeats=0)
