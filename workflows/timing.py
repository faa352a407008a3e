"""Timings that can be trusted: warm up, alternate, repeat, report the median with its spread.

One helper for the demo, ``attnproc render --compare`` and the UI. A single render says little: the first call
of a process pays for allocation, kernel selection and compilation, and a loaded machine adds noise. So
:func:`compare_runs` renders both methods ``warmup`` times untimed, then ``repeats`` rounds in alternating order
(method first in even rounds, reference first in odd ones, so drift and cache effects hit both alike), and
reports per method the median, min and max of the total time and of the time inside attention, the speedup
per round (reference / method, from runs adjacent in time) and whether the difference is within noise: the
two methods' [min, max] ranges overlap.

A run is a callable returning a dict with ``total_s`` and ``attention_s`` (what ``render.run_once`` returns).
"""
from __future__ import annotations

import statistics
from typing import Callable

Run = Callable[[], dict]
KEYS = ("total_s", "attention_s")


def stats(samples: list[float]) -> dict:
    """Median, min, max and the samples (seconds or ratios), rounded for reports."""
    return {"median": round(statistics.median(samples), 6), "min": round(min(samples), 6),
            "max": round(max(samples), 6), "runs": [round(s, 6) for s in samples]}


def measure_runs(run: Run, *, repeats: int = 3, warmup: int = 1) -> tuple[dict, dict]:
    """``warmup`` untimed runs, then ``repeats`` timed ones: (the last run's result, its timings)."""
    check_counts(repeats, warmup)
    for _ in range(warmup):
        run()
    results = [run() for _ in range(repeats)]
    return results[-1], _timings(results, repeats, warmup)


def compare_runs(run: Run, reference: Run, *, repeats: int = 3, warmup: int = 1,
                 names: tuple[str, str] = ("method", "reference")) -> tuple[dict, dict, dict]:
    """Time ``run`` against ``reference``, warmed up, alternating, ``repeats`` rounds.

    Returns (the last result of ``run``, the last result of ``reference``, the report): ``{name: timings}``
    for both, ``speedup`` (reference / run) for total and attention time as median/min/max over the rounds,
    ``within_noise`` and a one-line ``verdict``. ``within_noise`` is None with a single round (no spread).
    """
    check_counts(repeats, warmup)
    for _ in range(warmup):
        reference()
        run()
    mine, theirs = [], []
    for i in range(repeats):
        if i % 2 == 0:
            mine.append(run())
            theirs.append(reference())
        else:
            theirs.append(reference())
            mine.append(run())
    report = {names[0]: _timings(mine, repeats, warmup), names[1]: _timings(theirs, repeats, warmup),
              "order": "alternating", "speedup": {}}
    for key, label in (("total_s", "total"), ("attention_s", "attention")):
        ratios = [t[key] / max(m[key], 1e-12) for m, t in zip(mine, theirs)]
        a = [m[key] for m in mine]
        b = [t[key] for t in theirs]
        noise = None if repeats < 2 else bool(max(a) >= min(b) and max(b) >= min(a))
        report["speedup"][label] = {**stats(ratios), "within_noise": noise}
    report["within_noise"] = report["speedup"]["total"]["within_noise"]
    report["verdict"] = verdict(report["speedup"]["total"], names, repeats)
    return mine[-1], theirs[-1], report


def verdict(speedup: dict, names: tuple[str, str], repeats: int) -> str:
    """One line a person can read: how much faster, over how many runs, and whether it is noise."""
    m, lo, hi = speedup["median"], speedup["min"], speedup["max"]
    runs = f"median of {repeats} alternating warm runs, range {lo:.2f}-{hi:.2f}x"
    if speedup["within_noise"] is None:
        return f"{names[0]}: {m:.2f}x the speed of {names[1]} (one warm run each: no spread, cannot tell noise)"
    if speedup["within_noise"]:
        return f"{names[0]} vs {names[1]}: no difference beyond noise ({m:.2f}x, {runs})"
    return f"{names[0]}: {m:.2f}x the speed of {names[1]} ({runs})"


def _timings(results: list[dict], repeats: int, warmup: int) -> dict:
    out = {key: stats([r[key] for r in results]) for key in KEYS}
    out.update(repeats=repeats, warmup=warmup)
    if "attention_calls" in results[-1]:
        out["attention_calls"] = results[-1]["attention_calls"]
    return out


def check_counts(repeats: int, warmup: int) -> None:
    """Refuse repeat and warm-up counts that are not whole numbers in range."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: must be an integer >= 0, got {warmup!r}")
