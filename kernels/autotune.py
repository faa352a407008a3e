"""Measured backend choice for ``block_sparse_attention(backend="auto")``.

Which block-sparse backend is fastest depends on the machine (CPU model and thread count, GPU, torch build), so
``auto`` does not assume it: the first time a process meets a large call of a new *class* it times the backends
that can serve the call on that very call and keeps the fastest. The class is (device type, dtype, head dim,
gradient/LSE needed, threads on CPU, query-key pairs rounded to a power of two, block size, density band); the
choice is written to a small JSON file per machine in the user's cache folder, headed by the torch version and
the device name, so later processes reuse it without timing anything.

- ``ATTNPROC_CACHE_DIR`` moves the cache folder (default ``$XDG_CACHE_HOME/attnproc``, else ``~/.cache/attnproc``);
  a :class:`BackendTuner` built with ``directory=`` ignores it (tests use temporary folders).
- ``ATTNPROC_BACKEND`` overrides what ``auto`` resolves to: a backend name (``flex``, ``gather``, ...), or
  ``static`` for the fixed device order of :func:`~attnproc.kernels.select_backend` without timing.
- A cache file that does not parse, or was written by another torch version or device, is ignored with an
  :class:`AutotuneCacheWarning` and rewritten at the next measurement.
- Calls below ``min_pairs`` query-key pairs keep the fixed order (timing them costs more than it can save).
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch

__all__ = ["BackendTuner", "AutotuneCacheWarning", "default_tuner", "forced_backend", "cache_dir", "device_name",
           "density_band", "tune_key", "time_candidates", "CACHE_ENV", "BACKEND_ENV", "FORMAT"]

CACHE_ENV = "ATTNPROC_CACHE_DIR"
BACKEND_ENV = "ATTNPROC_BACKEND"
FORMAT = 1
FORCEABLE = ("flex", "triton", "gather", "dense", "xformers", "static")

Measure = Callable[[Mapping[str, Callable[[], object]]], dict]


class AutotuneCacheWarning(UserWarning):
    """The backend cache file was unreadable or written for another machine; it is ignored (and rewritten)."""


def forced_backend() -> str | None:
    """The ``ATTNPROC_BACKEND`` override, checked (``None`` when unset or empty)."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in FORCEABLE:
        raise ValueError(f"{BACKEND_ENV} must be one of {FORCEABLE} (or unset for measured auto); got {value!r}")
    return value


def cache_dir() -> Path:
    """Where the per-machine backend choices live: ``$ATTNPROC_CACHE_DIR``, ``$XDG_CACHE_HOME/attnproc`` or
    ``~/.cache/attnproc``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnproc"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """A readable name of the device's hardware (GPU name, or CPU model and core count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{_cpu_model()} ({os.cpu_count()} cores)"
    return device.type


def density_band(density: float) -> str:
    """Densities within a factor of two share a band: ``"50-100%"`` (50 % included), ``"25-50%"``, ... ``"<3%"``."""
    band = min(5, max(0, math.ceil(-math.log2(max(density, 1e-9))) - 1))
    if band == 5:
        return "<3%"
    hi = 100 / 2 ** band
    return f"{hi / 2:g}-{hi:g}%"


def tune_key(device_type: str, dtype: torch.dtype, *, head_dim: int, pairs: int, block: tuple[int, int],
             density: float, needs_grad: bool, return_lse: bool) -> str:
    """The class of a call that shares one measured choice."""
    threads = f"/threads{torch.get_num_threads()}" if device_type == "cpu" else ""
    return (f"{device_type}/{str(dtype).removeprefix('torch.')}/d{head_dim}{threads}/pairs2^{round(math.log2(pairs))}"
            f"/block{block[0]}x{block[1]}/density{density_band(density)}"
            f"{'/grad' if needs_grad else ''}{'/lse' if return_lse else ''}")


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def time_candidates(runs: Mapping[str, Callable[[], object]], *, reps: int = 3,
                    device_type: str = "cpu") -> dict:
    """Each run once untimed (compiles, allocations), then ``reps`` interleaved rounds: ``{name: {"median_ms",
    "min_ms", "max_ms"}}``, or ``{name: {"error": ...}}`` for a run that raised."""
    alive, out = dict(runs), {}
    for name, run in list(alive.items()):
        try:
            run()
            _sync(device_type)
        except Exception as exc:  # a backend that cannot run here (compile failure) is out of the race
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            del alive[name]
    samples = {name: [] for name in alive}
    for _ in range(reps):
        for name, run in alive.items():
            _sync(device_type)
            t = time.perf_counter()
            run()
            _sync(device_type)
            samples[name].append((time.perf_counter() - t) * 1e3)
    for name, xs in samples.items():
        out[name] = {"median_ms": round(statistics.median(xs), 4), "min_ms": round(min(xs), 4),
                     "max_ms": round(max(xs), 4)}
    return out


class BackendTuner:
    """Measured backend choices for one cache folder: read from its JSON file, timed on first need, written back.

    ``measure(runs) -> {name: {"median_ms": ...} or {"error": ...}}`` times candidate runs (default
    :func:`time_candidates`; tests inject timings). ``min_pairs``: smaller calls are not timed.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, min_pairs: int = 1 << 26,
                 measure: Measure | None = None, reps: int = 3):
        self.directory = Path(directory) if directory is not None else cache_dir()
        self.min_pairs = min_pairs
        self.reps = reps
        self._measure = measure
        self._choices: dict[str, dict[str, dict]] = {}  # device name -> {key: entry}, as read or measured

    def path(self, device: torch.device | str) -> Path:
        """The cache file of ``device``'s machine (one per device name)."""
        slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
        return self.directory / f"backends-{'-'.join(filter(None, slug.split('-')))[:80]}.json"

    def header(self, device: torch.device | str) -> dict:
        return {"format": FORMAT, "torch": torch.__version__, "device": device_name(device)}

    def choices(self, device: torch.device | str) -> dict[str, dict]:
        """The cached choices for ``device`` (read once; a corrupt or foreign file counts as empty, warned)."""
        name = device_name(device)
        if name not in self._choices:
            self._choices[name] = self._read(device)
        return self._choices[name]

    def _read(self, device, warn: bool = True) -> dict[str, dict]:
        path = self.path(device)
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            entries = data["choices"]
            if not isinstance(entries, dict) or not all(isinstance(e, dict) and isinstance(e.get("backend"), str)
                                                        for e in entries.values()):
                raise ValueError("'choices' is not a mapping of {key: {'backend': name, ...}}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not warn:
                return {}
            warnings.warn(f"backend cache {path} is unreadable ({type(exc).__name__}: {exc}); ignoring it, "
                          "backends will be timed again", AutotuneCacheWarning, stacklevel=4)
            return {}
        want = self.header(device)
        got = {k: data.get(k) for k in want}
        if got != want:
            if not warn:
                return {}
            warnings.warn(f"backend cache {path} was written for {got}, not this machine {want}; ignoring it, "
                          "backends will be timed again", AutotuneCacheWarning, stacklevel=4)
            return {}
        return dict(entries)

    def _write(self, device) -> None:
        path = self.path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.choices(device)
        mine.update({k: e for k, e in self._read(device, warn=False).items() if k not in mine})  # other processes'
        text = json.dumps({**self.header(device), "choices": mine}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file, never half of one

    def choose(self, device: torch.device | str, key: str, runs: Mapping[str, Callable[[], object]]) -> tuple[str, str]:
        """The backend for ``key``: cached, or the fastest of ``runs`` (timed now, then cached). Returns
        ``(name, reason)``."""
        device = torch.device(device)
        cached = self.choices(device).get(key)
        if cached is not None and cached["backend"] in runs:
            return cached["backend"], f"auto: measured earlier on this machine ({key})"
        if len(runs) == 1:
            return next(iter(runs)), "auto: the only backend that can serve this call"
        measure = self._measure or (lambda r: time_candidates(r, reps=self.reps, device_type=device.type))
        times = measure(runs)
        timed = {n: t["median_ms"] for n, t in times.items() if "median_ms" in t and n in runs}
        if not timed:
            raise RuntimeError(f"auto: no backend could run this call: {times}")
        best = min(timed, key=timed.get)
        self.choices(device)[key] = {"backend": best, "times": times}
        try:
            self._write(device)
        except OSError as exc:  # a read-only cache folder costs a re-measurement per process, nothing else
            warnings.warn(f"could not write the backend cache {self.path(device)}: {exc}", AutotuneCacheWarning,
                          stacklevel=3)
        shown = ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(timed.items(), key=lambda x: x[1]))
        return best, f"auto: fastest when timed now ({shown}; {key})"


_DEFAULT: dict[tuple[Path, int], BackendTuner] = {}  # one tuner per cache folder and threshold: a read cache


def default_tuner(min_pairs: int) -> BackendTuner:
    """The tuner of the current cache folder (``ATTNPROC_CACHE_DIR`` read at each call, so tests that point it at
    a temporary folder get a fresh tuner there)."""
    key = (cache_dir(), min_pairs)
    if key not in _DEFAULT:
        _DEFAULT[key] = BackendTuner(key[0], min_pairs=min_pairs)
    return _DEFAULT[key]
