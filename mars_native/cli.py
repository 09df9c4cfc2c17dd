"""The ``mars-native`` console script: ``simulate | detect | bench``.

``mars-native detect MODEL_FILE... [--global G] [--weights W...] [--out agg.safetensors]
[--json report.json]`` scores the client models with MARS, prints one row per client (CBE
summary, cluster, accepted, reason), and writes the aggregate of the accepted clients and a JSON
report. Client files are streamed (``MARS.round`` with a loader per file), so memory stays
O(one model) whatever the number of files.

Exit codes: 0 on success; 2 on unusable input (no files, an unreadable file, invalid options,
no valid client, nothing to aggregate without a global model), with a one-line reason on stderr.

``simulate`` and ``bench`` are provided by ``mars_native.sim.cli`` and ``mars_native.bench.cli``
(each with ``add_arguments(parser)`` and ``run(args) -> int``), imported only when used.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

PROG = "mars-native"

_PLUGINS = {
    "simulate": ("mars_native.sim.cli", "sim", "run the federated simulation arena"),
    "bench": ("mars_native.bench.cli", "bench", "benchmark the native core against NumPy"),
}


class UsageError(Exception):
    """Unusable input: reported as one line on stderr, exit code 2."""


def _fail(command: str, message: str) -> int:
    one_line = " ".join(str(message).split())
    print(f"{PROG} {command}: error: {one_line}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------- detect
def _add_detect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="MODEL_FILE",
                   help="client models (.safetensors, .pt/.pth, .npz), one per client")
    p.add_argument("--global", dest="global_path", metavar="G",
                   help="the server's global model: the template every client must match and the "
                        "base of global + server_lr * (mean - global)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one weight per client file (e.g. num_examples); default: equal")
    p.add_argument("--server-lr", type=float, default=1.0,
                   help="server learning rate, with --global (default 1.0)")
    p.add_argument("--kappa", type=float, default=0.05,
                   help="share of each layer's neurons in the CBE (default 0.05)")
    p.add_argument("--epsilon", type=float, default=0.03,
                   help="center distance below which every client is accepted (default 0.03)")
    p.add_argument("--selection", choices=("norm", "majority"), default="norm",
                   help="norm: keep the low-energy cluster (MARS); majority: the larger (MARS*)")
    p.add_argument("--mode", choices=("paper", "official"), default="paper",
                   help="the paper's algorithm or the authors' public code")
    p.add_argument("--include-linear", action="store_true", help="also score Linear layers")
    p.add_argument("--seed", type=int, default=0, help="clustering seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="reject a client file that cannot be read (reason in the report) instead "
                        "of stopping with exit code 2")
    p.add_argument("--out", metavar="PATH",
                   help="write the aggregated model (.safetensors, .npz or .pt)")
    p.add_argument("--json", dest="json_path", metavar="PATH",
                   help="write the report: Detection.to_dict() plus each client's file")


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else "-"


def client_table(report: Any, files: Sequence[str]) -> str:
    """One row per client: file, CBE length/min/median/max, cluster, accepted, reason."""
    rows = [("client", "cbe_len", "cbe_min", "cbe_median", "cbe_max", "cluster", "accepted", "reason")]
    for i, path in enumerate(files):
        cbe = report.cbe[i] if report.cbe.size else np.empty(0)
        cbe = cbe[np.isfinite(cbe)]
        stats = (np.min(cbe), np.median(cbe), np.max(cbe)) if cbe.size else (math.nan,) * 3
        label = int(report.labels[i])
        rows.append((path, str(cbe.size), *(_fmt(float(s)) for s in stats),
                     str(label) if label >= 0 else "-", "yes" if report.accepted[i] else "no",
                     report.reasons[i] or ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines)


def _write_json(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _detect(args: argparse.Namespace) -> int:
    from mars_native import io
    from mars_native.defense import MARS

    files = list(args.files)
    if not files:
        raise UsageError("no model files given (usage: mars-native detect MODEL_FILE... [options])")
    if args.weights is not None and len(args.weights) != len(files):
        raise UsageError(f"--weights has {len(args.weights)} values for {len(files)} model files")
    for path in [*files, *([args.global_path] if args.global_path else [])]:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    for path in (args.out, args.json_path):
        if path is not None and os.path.isdir(path):
            raise UsageError(f"{path} is a directory; give a file name")
    if args.out is not None:
        io.file_format(args.out)  # fail now, not after the work, on an unsupported extension
    global_state = io.load_state_dict(args.global_path) if args.global_path else None
    mars = MARS(kappa=args.kappa, epsilon=args.epsilon, selection=args.selection, mode=args.mode,
                include_linear=args.include_linear, random_state=args.seed, n_threads=args.threads)
    rnd = mars.round(global_state=global_state, server_lr=args.server_lr)
    weights = args.weights or [1.0] * len(files)
    for path, weight in zip(files, weights):
        try:
            state = io.load_state_dict(path)
        except (ValueError, OSError, ImportError) as exc:
            if not args.skip_unreadable:
                raise UsageError(str(exc)) from exc
            rnd.add_rejected(f"invalid_type: cannot read the file: {exc}", name=path)
            continue
        rnd.add(state, weight, loader=functools.partial(io.load_state_dict, path), name=path)
        del state  # the round keeps no reference: memory stays O(one model)
    try:
        new_state, report = rnd.finish()
    except RuntimeError as exc:
        raise UsageError(str(exc)) from exc

    print(client_table(report, files))
    n_ok = int(report.accepted.sum())
    print(f"accepted {n_ok}/{report.n_clients}; center distance {_fmt(report.center_distance)} "
          f"(epsilon {args.epsilon:g}); kept cluster "
          f"{'all' if report.kept_cluster is None else report.kept_cluster}"
          + (f"; note: {report.note}" if report.note else ""))
    written = None
    if args.out is not None and new_state is not None:
        io.save_state_dict(new_state, args.out)
        written = args.out
        print(f"wrote the aggregated model to {args.out}")
    if args.json_path is not None:
        _write_json(args.json_path, {
            "report": report.to_dict(), "clients": files, "global": args.global_path,
            "aggregated": written,
        })
        print(f"wrote the report to {args.json_path}")
    if not (report.labels >= 0).any():
        raise UsageError("no client model is valid (see the reasons above)")
    if new_state is None:
        raise UsageError(report.note or "nothing to aggregate")
    return 0


# ---------------------------------------------------------------------------------- plugins
def _run_plugin(command: str, argv: Sequence[str]) -> int:
    module_name, extra, help_text = _PLUGINS[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return _fail(command, f"{command} is unavailable ({exc}); install it with "
                              f"pip install 'mars-native[{extra}]'")
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(list(argv))
    try:
        return int(module.run(args) or 0)
    except (ValueError, TypeError, OSError) as exc:
        return _fail(command, str(exc))


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (``detect`` fully; ``simulate``/``bench`` are parsed by their
    modules)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="MARS backdoor defense for federated learning (native core).")
    from mars_native import build_info

    parser.add_argument("--version", action="version", version=f"%(prog)s {build_info()['version']}")
    sub = parser.add_subparsers(dest="command", metavar="{simulate,detect,bench}")
    for command, (_, _, help_text) in _PLUGINS.items():
        sub.add_parser(command, help=help_text, add_help=False)
    detect = sub.add_parser(
        "detect", help="score client model files, aggregate the accepted ones",
        description="Score client model files with MARS, print the decision per client, and "
                    "write the aggregated model and a JSON report.")
    _add_detect_arguments(detect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mars-native`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PLUGINS:
        return _run_plugin(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _detect(args)
    except (UsageError, ValueError, TypeError, OSError, ImportError) as exc:
        return _fail("detect", str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
