"""python -m bench <family|all|plot|report|sweep> [--quick] [--device cuda|cpu] [--out PATH]

Every module bench/<family>.py that defines FAMILY and run(ctx) -> list[Row] is a suite.
Prints one table and writes JSON (bench/results/<device>-<date>.json on GPU).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import torch

from bench import common
from bench.cli import Parser as _Parser
from bench.cli import ResultFileError


def discover() -> dict:
    suites = {}
    for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
        if info.name in ("cli", "common", "plot", "report") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if hasattr(module, "FAMILY") and hasattr(module, "run"):
            suites[module.FAMILY] = module
    return dict(sorted(suites.items()))


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu or cuda, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {text!r} asked for, but torch sees no CUDA GPU")
    return device


def _check_out(path: str) -> None:
    """--out must be a writable file path (checked before the suites run, not after)."""
    if os.path.isdir(path):
        raise ValueError(f"--out: expected a JSON file path, got the directory {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise ValueError(f"--out: {existing!r} is a file, not a directory")
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--out: cannot write under {existing!r}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except ResultFileError as e:  # a results JSON / doc page that cannot be used (a ValueError): a file problem
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ImportError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _main(argv: list) -> int:
    if argv[:1] == ["plot"]:  # python -m bench plot [--results DIR] [--out DIR]
        from bench import plot

        return plot.main(argv[1:])
    if argv[:1] == ["report"]:  # python -m bench report [--ingest FILE] (bench/report.py)
        from bench import report

        return report.main(argv[1:])
    if argv[:1] == ["sweep"]:  # python -m bench sweep [...] (bench/sweep.py: every variant, the GEMM tuning table)
        from bench import sweep

        return sweep.main(argv[1:])
    suites = discover()
    parser = _Parser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=[*suites, "all", "plot", "report", "sweep"],
                        help="suite to run, or plot (bench/plot.py), report (bench/report.py), sweep (bench/sweep.py)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)

    device = _device(args.device)
    if args.out is not None:
        _check_out(args.out)
    on_cpu = device.type == "cpu"
    ctx = common.Context(device=device, quick=args.quick or on_cpu,
                         warmup=1 if on_cpu else 5, repeats=3 if on_cpu else 20)
    env = common.environment(device)
    print(f"# {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | driver {env['driver']} | "
          f"commit {env['commit']} | {env['date']}")
    if on_cpu:
        print("# no GPU: running the pure-torch references on the CPU (smoke run, not a performance result)")
    names = list(suites) if args.name == "all" else [args.name]
    rows: list[common.Row] = []
    for name in names:
        rows.extend(suites[name].run(ctx))
    print(common.format_table(rows))
    path = args.out or common.results_path(env, device)
    common.write_results(rows, env, path)
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
