"""``mars-native bench``: run the benchmark suite and print/write the results.

Examples::

    mars-native bench --quick                       # ~1-2 minutes on a quiet 2-core machine
    mars-native bench --full --out bench-results    # all models, N up to 100 / 10,000 (long)
    mars-native bench --groups cbe --models resnet18 --clients 20 --json cbe.json

``--out DIR`` writes ``results.json``, ``results.md`` (the README section) and ``bench.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from mars_native._json import json_safe

__all__ = ["add_arguments", "run"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mars-native bench``."""
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="cnn + resnet18, N = 10, 20 clients, clustering N = 20..1,000 (default)")
    preset.add_argument("--full", action="store_true",
                        help="cnn, resnet18, resnext50; N = 10, 20, 100 clients; clustering N up to "
                             "10,000 (tens of minutes)")
    parser.add_argument("--groups", type=_str_list, metavar="G,...",
                        help="subset of: cbe, cluster, aggregate, round")
    parser.add_argument("--models", type=_str_list, metavar="M,...",
                        help="subset of: cnn, resnet18, resnext50 (tiny-cnn, tiny-resnet, tiny-resnext "
                             "for smoke tests)")
    parser.add_argument("--clients", type=_int_list, metavar="N,...", help="clients per round")
    parser.add_argument("--cluster-sizes", type=_int_list, metavar="N,...",
                        help="numbers of CBEs to cluster")
    parser.add_argument("--repeat", type=int, metavar="K", help="timed runs per figure (best of K)")
    parser.add_argument("--threads", type=int, default=0, metavar="T",
                        help="threads for mars_native, torch and the read floor (default: all CPUs)")
    parser.add_argument("--budget", type=float, metavar="S",
                        help="seconds after which a slow baseline is extrapolated from fewer clients")
    parser.add_argument("--max-memory-gb", type=float, metavar="GB",
                        help="cap on the client states held at once (fewer clients above it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the README results section")
    parser.add_argument("--plot", metavar="PATH", help="write the PNG figure")
    parser.add_argument("--out", metavar="DIR",
                        help="write results.json, results.md and bench.png into DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _config(args: argparse.Namespace) -> Any:
    from mars_native.bench.cases import GROUPS, Config
    from mars_native.bench.models import MODELS

    overrides: dict[str, Any] = {}
    if args.groups is not None:
        bad = sorted(set(args.groups) - set(GROUPS))
        if bad:
            raise ValueError(f"unknown group(s) {bad}; choose from {list(GROUPS)}")
        overrides["groups"] = list(args.groups)
    if args.models is not None:
        bad = sorted(set(args.models) - set(MODELS))
        if bad:
            raise ValueError(f"unknown model(s) {bad}; choose from {sorted(MODELS)}")
        overrides["models"] = list(args.models)
    for name in ("clients", "cluster_sizes", "repeat", "seed"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.repeat is not None and args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    overrides["threads"] = args.threads
    if args.budget is not None:
        overrides["slow_budget_s"] = args.budget
    if args.max_memory_gb is not None:
        overrides["max_memory_gb"] = args.max_memory_gb
    return Config.full(**overrides) if args.full else Config.quick(**overrides)


def run(args: argparse.Namespace) -> int:
    """Runs the suite; prints the tables; writes the requested files. Returns 0."""
    from mars_native.bench import cases, plot, report

    config = _config(args)
    json_path, md_path, png_path = args.json_path, args.markdown, args.plot
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        json_path = json_path or os.path.join(args.out, "results.json")
        md_path = md_path or os.path.join(args.out, "results.md")
        png_path = png_path or os.path.join(args.out, "bench.png")

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    machine = report.machine_info()
    progress(f"mars-native bench ({config.mode}): {machine['cpu']}, {config.resolved_threads()} threads, "
             f"load {machine['load_average']}")
    results = cases.Suite(config, progress).run()
    results["machine"] = machine
    try:
        results["load_average_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        results["load_average_end"] = None
    results["command"] = _command_line(sys.argv)
    results["targets"] = report.targets(results)
    results["scaling"] = report.scaling(results)
    print(report.text_tables(results))
    for t in results["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3g} {t['unit']} "
              f"(goal {t['direction']} {t['limit']:g})")
    for line in results["scaling"]:
        print(f"scaling: {line}")
    if png_path:
        plot.plot_results(results, png_path)
        print(f"wrote {png_path}")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(json_safe(results), fh, indent=1, allow_nan=False)
            fh.write("\n")
        print(f"wrote {json_path}")
    if md_path:
        rel_png = os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path))) if png_path else None
        with open(md_path, "w", encoding="utf-8") as fh:
            fh.write(report.markdown_report(results, results["command"], rel_png))
        print(f"wrote {md_path}")
    return 0


def _command_line(argv: list[str]) -> str | None:
    """``mars-native bench ...`` as typed, from ``sys.argv`` of the console script,
    ``python -m mars_native.cli`` or ``python -m mars_native.bench.cli``; None from Python."""
    prog = os.path.basename(argv[0]) if argv else ""
    if not (prog.startswith("mars-native") or prog == "cli.py"):
        return None  # called from Python (tests, notebooks)
    rest = argv[1:]
    if rest[:1] == ["bench"]:
        rest = rest[1:]
    return " ".join(["mars-native", "bench", *(shlex.quote(a) for a in rest)])


def main(argv: list[str] | None = None) -> int:
    """``python -m mars_native.bench.cli``: the same as ``mars-native bench``."""
    parser = argparse.ArgumentParser(prog="mars-native bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
