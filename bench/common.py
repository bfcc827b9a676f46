"""Timing, environment capture, the results table and JSON for every benchmark family.

GPU: CUDA events around each call, L2 flushed (a 256 MiB buffer rewritten) before every repeat,
median of the repeats. CPU: wall-clock medians. The same warm-up, flush and repeats for ours and the peer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable

import torch

def _results_dir() -> str:
    """bench/results in a checkout; ./bench-results when bench runs from an installed package."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(os.path.dirname(here), "setup.py")):
        return os.path.join(here, "results")
    return os.path.join(os.getcwd(), "bench-results")


RESULTS_DIR = _results_dir()


@dataclasses.dataclass
class Row:
    family: str
    case: dict
    metric: str  # "TFLOPS" | "GB/s" | "tokens/s"
    ours: float
    peer: str | None = None
    peer_value: float | None = None
    ms: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.peer_value in (None, 0) or self.ours is None:
            return None
        return self.ours / self.peer_value

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        if not d["extra"]:
            del d["extra"]
        return d


@dataclasses.dataclass
class Context:
    device: torch.device
    quick: bool = False
    warmup: int = 3
    repeats: int = 10

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


_l2_flush_buffer: torch.Tensor | None = None


def _flush_l2() -> None:
    global _l2_flush_buffer
    if _l2_flush_buffer is None:
        _l2_flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    _l2_flush_buffer.zero_()


def time_ms(fn: Callable[[], object], ctx: Context, flush_l2: bool = True) -> float:
    """Median milliseconds of fn() over ctx.repeats after ctx.warmup calls."""
    for _ in range(ctx.warmup):
        fn()
    samples = []
    if ctx.is_cuda:
        torch.cuda.synchronize()
        for _ in range(ctx.repeats):
            if flush_l2:
                _flush_l2()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(ctx.repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_gbps(nbytes: int, ctx: Context) -> float:
    """Measured copy bandwidth (bytes read + written per second, GB/s) of a device-to-device copy that
    moves nbytes in all: the ceiling a memory-bound kernel is compared with."""
    a = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=ctx.device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), ctx)
    return 2 * a.numel() / 1e9 / (ms / 1e3)


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Set (or, with None, unset) one environment variable for the duration of the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def kernel_variants(ctx: Context, flag: str) -> list[tuple[str, contextlib.AbstractContextManager]]:
    """(label, context) for every kernel of a family to time on this device: the default kernel (flag
    unset), plus the opt-in Hopper one (flag=1) on sm_90; the launch code reads the flag per call."""
    variants = [("default", env_var(flag, None))]
    if ctx.is_cuda and torch.cuda.get_device_capability(ctx.device) == (9, 0):
        variants.append(("sm90", env_var(flag, "1")))
    return variants


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.exists(os.path.join(root, "setup.py")):  # an installed bench: no checkout to ask
            raise OSError("not a checkout")
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DEEPKERNELS_COMMIT", "unknown")


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            driver = "unknown"
        extra = {"sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}
    else:
        name, driver, extra = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", None, {}
    import deepkernels

    return {"device": name, "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda,
            "commit": git_commit(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "deepkernels_extension": deepkernels.build_info()["extension_loaded"], **extra}


def results_path(env: dict, device: torch.device) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
    date = env["date"][:10]
    # CPU runs are smoke runs of the references: kept out of git (*.tmp is ignored).
    suffix = ".json" if device.type == "cuda" else ".json.tmp"
    return os.path.join(RESULTS_DIR, f"{slug}-{date}{suffix}")


def write_results(rows: list[Row], env: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    existing = []
    if os.path.exists(path):  # one file per device and day: later families append
        with open(path) as f:
            prev = json.load(f)
        families = {r.family for r in rows}
        existing = [r for r in prev.get("results", []) if r["family"] not in families]
    with open(path, "w") as f:
        json.dump({**env, "results": existing + [r.to_json() for r in rows]}, f, indent=1)
        f.write("\n")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[Row]) -> str:
    header = ["family", "case", "metric", "ours", "peer", "peer value", "ratio", "ms"]
    body = [[r.family, " ".join(f"{k}={v}" for k, v in r.case.items()), r.metric, _fmt(r.ours), r.peer or "-",
             _fmt(r.peer_value), _fmt(r.ratio), _fmt(r.ms)] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])
