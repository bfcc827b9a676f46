"""The bench CLIs' error convention (as `python -m deepkernels.demo` and the model CLI): one ``error: ...``
line on stderr and exit 2 for a bad flag or value, exit 1 for a file that cannot be read or used; never
argparse's usage block, never a traceback. ``python -m bench`` (bench/__main__.py) maps the exceptions.
"""
from __future__ import annotations

import argparse
import json
import numbers
import os


class Parser(argparse.ArgumentParser):
    """argparse with a one-line ``error: ...`` (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class ResultFileError(ValueError):
    """A results JSON or a doc page that cannot be used (exit 1); the message starts with the path."""


ROW_TYPES = {"family": str, "case": dict, "metric": str}  # + "ours": a number or None


def read_results(path: str) -> dict:
    """A bench results JSON (bench/common.write_results): ``{..., "results": [row, ...]}``, each row with
    family (str), case (dict), metric (str) and ours (number or null). ResultFileError naming the file (and
    the row) otherwise; OSError when it cannot be read."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ResultFileError(f"{path}: not a bench result: expected JSON, got invalid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        got = type(data).__name__ if not isinstance(data, dict) else f"keys {sorted(data)}"
        raise ResultFileError(f"{path}: not a bench result: expected a JSON object with a 'results' list, "
                              f"got {got}")
    for i, row in enumerate(data["results"]):
        if not isinstance(row, dict):
            raise ResultFileError(f"{path}: not a bench result: results[{i}]: expected an object, got "
                                  f"{type(row).__name__}")
        for key, typ in ROW_TYPES.items():
            if not isinstance(row.get(key), typ):
                raise ResultFileError(f"{path}: not a bench result: results[{i}].{key}: expected a {typ.__name__}, got "
                                      f"{type(row.get(key)).__name__ if key in row else 'nothing (missing)'}")
        ours = row.get("ours")
        if ours is not None and (isinstance(ours, bool) or not isinstance(ours, numbers.Real)):
            raise ResultFileError(f"{path}: not a bench result: results[{i}].ours: expected a number or null, "
                                  f"got {ours!r}")
    return data


def check_results_dir(path: str, default: str) -> None:
    """--results: an existing directory (the default may be absent: an installed package has no results)."""
    if not os.path.isdir(path) and os.path.abspath(path) != os.path.abspath(default):
        raise ResultFileError(f"--results: expected a directory of bench JSON files, got {path!r} "
                              f"({'a file' if os.path.exists(path) else 'no such directory'})")
