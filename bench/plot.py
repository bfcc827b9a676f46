"""python -m bench plot [--results DIR] [--out DIR]: the JSON under bench/results/ -> PNGs (matplotlib).

One figure per family found: gemm (TFLOPS per shape, ours vs peer), mla (GB/s and TFLOPS vs mean
sequence length, with the bandwidth/compute ceilings from a row's ``extra`` keys ``peak_GB/s`` /
``peak_TFLOPS`` or the per-device constants below), moe (dispatch/combine GB/s), quant (GB/s).
Only ``*.json`` files are read (CPU smoke runs are ``*.json.tmp`` and ignored).
"""
from __future__ import annotations

import glob
import os

from bench.cli import Parser, check_results_dir, read_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS = os.path.join(ROOT, "bench", "results")
DEFAULT_OUT = os.path.join(ROOT, "docs", "img")
# Datasheet ceilings (dense fp8/bf16 tensor TFLOPS, HBM GB/s) used when a row carries none.
DEVICE_PEAKS = {"h100": {"GB/s": 3350.0, "TFLOPS": 989.0}, "h200": {"GB/s": 4800.0, "TFLOPS": 989.0}}


def _label(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items() if k not in ("page", "backend"))


def _peaks(env: dict, rows: list) -> dict:
    peaks = {}
    for r in rows:
        for key in ("GB/s", "TFLOPS"):
            v = (r.get("extra") or {}).get(f"peak_{key}")
            if v:
                peaks[key] = float(v)
    name = str(env.get("device", "")).lower()
    for dev, p in DEVICE_PEAKS.items():
        if dev in name:
            for k, v in p.items():
                peaks.setdefault(k, v)
    return peaks


def _bars(ax, rows, title, ylabel):
    import numpy as np

    labels = [_label(r["case"]) for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["ours"] or 0 for r in rows], 0.4, label="deepkernels")
    if any(r.get("peer_value") is not None for r in rows):
        peer = next((r["peer"] for r in rows if r.get("peer")), "peer")
        ax.bar(x + 0.2, [r.get("peer_value") or 0 for r in rows], 0.4, label=peer)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def _mla(ax_bw, ax_fl, rows, peaks):
    groups: dict = {}
    for r in rows:
        c = r["case"]
        key = ",".join(f"{k}={v}" for k, v in c.items() if k not in ("mean_sk", "sk", "seqlen"))
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["case"].get("mean_sk", r["case"].get("seqlen", 0)))
        xs = [r["case"].get("mean_sk", r["case"].get("seqlen", 0)) for r in rs]
        ex = [r.get("extra") or {} for r in rs]
        ax_bw.plot(xs, [e.get("GB/s", r["ours"] if r["metric"] == "GB/s" else 0) for e, r in zip(ex, rs)],
                   marker="o", label=key)
        ax_fl.plot(xs, [e.get("TFLOPS", r["ours"] if r["metric"] == "TFLOPS" else 0) for e, r in zip(ex, rs)],
                   marker="o", label=key)
    for ax, metric in ((ax_bw, "GB/s"), (ax_fl, "TFLOPS")):
        if metric in peaks:
            ax.axhline(peaks[metric], color="k", linestyle="--", label=f"ceiling {peaks[metric]:.0f} {metric}")
        ax.set_xlabel("mean sequence length")
        ax.set_ylabel(metric)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=6)
    ax_bw.set_title("MLA decode: bandwidth vs roofline", fontsize=9)
    ax_fl.set_title("MLA decode: compute vs roofline", fontsize=9)


def plot(results_dir: str = DEFAULT_RESULTS, out_dir: str = DEFAULT_OUT) -> list[str]:
    """Write one PNG per (result file, family); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [(path, read_results(path)) for path in sorted(glob.glob(os.path.join(results_dir, "*.json")))]
    if results:  # every file read and checked before anything is written
        os.makedirs(out_dir, exist_ok=True)
    written = []
    for path, data in results:
        env = {k: v for k, v in data.items() if k != "results"}
        stem = os.path.splitext(os.path.basename(path))[0]
        by_family: dict = {}
        for r in data.get("results", []):
            by_family.setdefault(r["family"], []).append(r)
        caption = f"{env.get('device')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | commit {env.get('commit')}"
        for family, rows in sorted(by_family.items()):
            if family == "mla":
                fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
                _mla(a, b, rows, _peaks(env, rows))
            else:
                fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
                metric = rows[0]["metric"]
                title = {"gemm": "FP8 GEMM TFLOPS per shape", "moe": "MoE dispatch/combine GB/s",
                         "quant": "FP8 quantisation GB/s"}.get(family, f"{family} {metric}")
                _bars(ax, rows, title, metric)
            fig.suptitle(caption, fontsize=7)
            fig.tight_layout()
            out = os.path.join(out_dir, f"{stem}-{family}.png")
            fig.savefig(out, dpi=110)
            plt.close(fig)
            written.append(out)
    return written


def main(argv=None) -> int:
    p = Parser(prog="python -m bench plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=DEFAULT_RESULTS, help="directory of bench results *.json")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for the PNGs")
    args = p.parse_args(argv)
    check_results_dir(args.results, DEFAULT_RESULTS)
    written = plot(args.results, args.out)
    for w in written:
        print(f"# wrote {w}")
    if not written:
        print(f"# no *.json results under {args.results} (GPU runs write them: bash bench/gpu_check.sh)")
    return 0
