"""Benchmarks of the native core against pure NumPy, batched torch, the authors' approach and the
memory floor (``mars-native bench``; needs the ``bench`` extra: torch, scipy, scikit-learn,
matplotlib).

Modules: :mod:`models` (benchmark networks, client populations), :mod:`baselines` (every timed
implementation), :mod:`timing` (protocol, memory), :mod:`cases` (the suite), :mod:`report`
(tables, targets, scaling, README section), :mod:`plot` (PNG), :mod:`cli` (the command).
"""

from __future__ import annotations

__all__ = ["run_suite"]


def run_suite(config=None, progress=None) -> dict:
    """Runs the benchmark suite (:class:`mars_native.bench.cases.Config`, quick preset by default)
    and returns the results dict (cases, machine info, targets, scaling)."""
    from mars_native.bench import cases, report

    config = config or cases.Config.quick()
    results = cases.Suite(config, progress).run()
    results["machine"] = report.machine_info()
    results["targets"] = report.targets(results)
    results["scaling"] = report.scaling(results)
    return results
