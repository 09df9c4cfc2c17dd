"""Timing and memory measurement for the benchmark suite.

Protocol (the same for every implementation of a case, so warm caches are treated alike):

1. warm-up: each implementation runs once, untimed (on one client for the slow baselines, whose
   warm-up run also decides whether they are extrapolated; on the full data otherwise): imports,
   lazy initialisation, thread pools and allocator state are warmed;
2. timed runs: ``repeat`` rounds, round-robin over the implementations (so slow drifts of the
   machine's load hit all of them alike), each run timed with ``time.perf_counter`` with the
   cyclic garbage collector paused (as ``timeit`` does);
3. the reported figure is the best (minimum) of the ``k`` runs; the median and every sample are
   kept in the JSON output. An implementation whose runs exceed the time budget stops early
   (``k`` is reported per figure).

An implementation may return an :class:`Estimate` instead of running on the full data (e.g. the
authors' approach on 100 clients, extrapolated linearly from a subset of clients, or the pairwise
scipy matrix of 10,000 CBEs from a sample of pairs); the figure is then flagged as estimated.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Estimate", "Figure", "RssSampler", "measure", "peak_rss_delta"]


@dataclass(frozen=True)
class Estimate:
    """A time that was extrapolated rather than measured in full: ``seconds`` and how."""

    seconds: float
    how: str


@dataclass
class Figure:
    """The timings of one implementation in one case."""

    samples: list[float] = field(default_factory=list)
    estimated: str | None = None  # how the time was extrapolated, None when measured in full
    error: str | None = None

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def k(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"best_s": self.best, "median_s": self.median, "k": self.k,
                "samples_s": list(self.samples), "estimated": self.estimated, "error": self.error}


def _run_once(fn: Callable[[], Any]) -> tuple[float, str | None]:
    """One timed run with the cyclic garbage collector paused (as ``timeit`` does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()
    if isinstance(result, Estimate):
        return result.seconds, result.how
    return elapsed, None


def measure(
    impls: Mapping[str, Callable[[], Any]],
    repeat: int,
    budget_s: float = 30.0,
    warmups: Mapping[str, Callable[[], Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Figure]:
    """Times every implementation (see the module docstring for the protocol).

    Args:
        impls: name -> zero-argument callable running the implementation on the full data.
        repeat: timed runs per implementation (at least 1 is always made).
        budget_s: an implementation stops being repeated once its timed runs sum past this.
        warmups: name -> callable for the warm-up run (default: the implementation itself).
        progress: called with a short line after each implementation's first timed run.
    """
    figures = {name: Figure() for name in impls}
    spent = {name: 0.0 for name in impls}
    gc.collect()
    for name in impls:
        warm = (warmups or {}).get(name, impls[name])
        try:
            warm()
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            figures[name].error = f"{type(exc).__name__}: {exc}"
    for r in range(max(1, repeat)):
        for name, fn in impls.items():
            fig = figures[name]
            if fig.error is not None or (r > 0 and spent[name] >= budget_s):
                continue
            try:
                seconds, how = _run_once(fn)
            except Exception as exc:  # noqa: BLE001
                fig.error = f"{type(exc).__name__}: {exc}"
                continue
            fig.samples.append(seconds)
            fig.estimated = how
            spent[name] += seconds if how is None else 0.0
            if how is not None:
                spent[name] = budget_s  # an estimate is not repeated
            if r == 0 and progress is not None:
                progress(f"{name} {seconds * 1e3:.1f} ms" + (" (est.)" if how else ""))
    return figures


# ---------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples the process's resident set size every ``interval`` seconds in a thread; ``peak``
    is the largest value seen (Linux only: reads /proc/self/statm)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:  # noqa: PYI034
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _release_free_memory() -> None:
    """Hand the free memory back to the OS, so that memory freed by earlier cases is not
    silently reused and hidden from the next RSS measurement: mars_native's buffer cache (its
    limit set to 0 and back) and the C allocator's free pages (glibc ``malloc_trim``)."""
    from mars_native import _core

    limit = _core.buffer_cache_info()["limit_bytes"]
    _core.set_buffer_cache_limit(0)
    _core.set_buffer_cache_limit(limit)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measurements may read low, as documented
        pass


def peak_rss_delta(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory (bytes) above the level before ``fn()`` while it runs, its result
    still held (None where /proc is unavailable). RSS is sampled every 2 ms. Free memory that
    mars_native's buffer cache and the C allocator keep is first returned to the OS (the cache
    emptied, glibc ``malloc_trim``); on other C libraries reused free memory is not counted, so
    figures may read low there."""
    if not os.path.exists("/proc/self/statm"):
        return None
    gc.collect()
    _release_free_memory()
    before = _rss_bytes()
    with RssSampler() as sampler:
        result = fn()
    del result
    return float(max(0, sampler.peak - before))
