"""python -m bench report [--ingest FILE ...] [--results DIR] [--doc PATH] [--img DIR]

Turns the GPU results under bench/results/*.json into docs/performance.md's "Results" section: one
subsection per result file with its device, driver, torch, CUDA, commit and date, a table per family
(ours, peer, ratio), the plots of `python -m bench plot`, and each issue's performance target checked
against the rows that measure it. Only the text between the two `results` markers of the page is
rewritten. ``--ingest`` first copies a `python -m bench all --out FILE` JSON (e.g. the bench.json that
bench/gpu_check.sh leaves in $OUT) to bench/results/<device>-<date>.json; CPU runs are refused.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil

from bench import plot as _plot
from bench.cli import Parser, ResultFileError, check_results_dir, read_results
from bench.common import _fmt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DOC = os.path.join(ROOT, "docs", "performance.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ENV_KEYS = ("device", "driver", "torch", "cuda", "commit", "date")


def _case(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def ingest(path: str, results_dir: str = _plot.DEFAULT_RESULTS) -> str:
    """Copy one bench JSON into results_dir under its canonical name; returns the new path."""
    data = read_results(path)
    missing = [k for k in ENV_KEYS if k not in data]
    if missing:
        raise ResultFileError(f"{path}: not a bench result (missing {missing})")
    if str(data["device"]).lower().startswith("cpu"):
        raise ResultFileError(f"{path}: a CPU run is a smoke run of the references, not a performance result")
    slug = re.sub(r"[^a-z0-9]+", "-", str(data["device"]).lower()).strip("-")[:40]
    dest = os.path.join(results_dir, f"{slug}-{str(data['date'])[:10]}.json")
    os.makedirs(results_dir, exist_ok=True)
    shutil.copyfile(path, dest)
    return dest


def targets(rows: list[dict]) -> list[tuple[str, str, str, bool]]:
    """(target, case, measured, met) for every row that an issue's performance target speaks of."""
    out = []
    # a kernel variant's row (case "kernel": "sm90") is compared with the peer timed beside the default one
    peers = {(r["family"], _case(r["case"])): (r["peer"], r["peer_value"]) for r in rows if r.get("peer_value")}
    for r in rows:
        fam, c, ex = r["family"], r["case"], r.get("extra") or {}
        peer, peer_value = peers.get((fam, _case({k: v for k, v in c.items() if k != "kernel"})), (None, None))
        if fam == "gemm" and c.get("kind") == "dense" and peer_value:
            m, ratio = c.get("m", 0), r["ours"] / peer_value
            goal = 1.1 if m >= 4096 else 1.2 if m <= 128 else None
            if goal is not None:
                out.append((f"GEMM dense >= {goal}x {peer}", _case(c), f"{ratio:.2f}x", ratio >= goal))
        elif fam == "mla" and c.get("cache", "bf16") == "bf16":
            if c.get("h_q") == 128 and c.get("s_q") == 2:
                tf = ex.get("TFLOPS", r["ours"] if r["metric"] == "TFLOPS" else None)
                if tf is not None:
                    out.append(("MLA compute-bound >= 600 TFLOPS", _case(c), f"{tf:.0f} TFLOPS", tf >= 600))
            elif r["metric"] == "GB/s" and ex.get("copy_GB/s"):
                frac = r["ours"] / ex["copy_GB/s"]
                out.append(("MLA memory-bound >= 90% of copy bandwidth", _case(c), f"{100 * frac:.0f}%", frac >= 0.9))
        elif fam == "moe" and "frac_of_copy" in ex:
            out.append(("MoE kernel >= 80% of copy bandwidth", _case(c), f"{100 * ex['frac_of_copy']:.0f}%",
                        ex["frac_of_copy"] >= 0.8))
            if r.get("ratio") is not None:
                out.append(("MoE kernel >= 3x PyTorch", _case(c), f"{r['ratio']:.1f}x", r["ratio"] >= 3))
    by_kind = {(c["n"], c["k"], c["m"] * c.get("groups", 1), c.get("kernel")): r["ours"] for r in rows
               if r["family"] == "gemm" and (c := r["case"]).get("kind") == "dense"}
    for r in rows:
        c = r["case"]
        if r["family"] == "gemm" and c.get("kind") in ("contiguous", "masked"):
            dense = by_kind.get((c["n"], c["k"], c["m"] * c.get("groups", 1), c.get("kernel")))
            if dense:
                out.append(("GEMM grouped within 10% of dense at equal total M", _case(c),
                            f"{r['ours'] / dense:.2f}x dense", r["ours"] >= 0.9 * dense))
    return out


def section(results_dir: str, img_dir: str, doc_dir: str) -> str:
    paths = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    if not paths:
        return "No GPU result has been committed yet (see above for how to produce one).\n"
    parts = ["| device | driver | torch | CUDA | commit | date |", "| --- | --- | --- | --- | --- | --- |"]
    datas = []
    for p in paths:
        d = read_results(p)
        datas.append((p, d))
        parts.append("| " + " | ".join(str(d.get(k)) for k in ENV_KEYS) + " |")
    for p, d in datas:
        stem = os.path.splitext(os.path.basename(p))[0]
        rows = d.get("results", [])
        parts += ["", f"### {d.get('device')} — commit {d.get('commit')}, {str(d.get('date'))[:10]}", "",
                  f"Source: `{os.path.relpath(p, ROOT)}`; torch {d.get('torch')}, CUDA {d.get('cuda')}, "
                  f"driver {d.get('driver')}."]
        for fam in sorted({r["family"] for r in rows}):
            parts += ["", f"#### {fam}", "", "| case | metric | ours | peer | peer value | ratio | ms |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            parts += [f"| {_case(r['case'])} | {r['metric']} | {_fmt(r['ours'])} | {r.get('peer') or '-'} | "
                      f"{_fmt(r.get('peer_value'))} | {_fmt(r.get('ratio'))} | {_fmt(r.get('ms'))} |"
                      for r in rows if r["family"] == fam]
            png = os.path.join(img_dir, f"{stem}-{fam}.png")
            if os.path.exists(png):
                parts += ["", f"![{fam} on {d.get('device')}]({os.path.relpath(png, doc_dir)})"]
        checks = targets(rows)
        if checks:
            met = sum(ok for *_, ok in checks)
            parts += ["", f"#### Targets: {met} of {len(checks)} met", "", "| target | case | measured | met |",
                      "| --- | --- | --- | --- |"]
            parts += [f"| {t} | {c} | {m} | {'yes' if ok else '**no**'} |" for t, c, m, ok in checks]
    return "\n".join(parts) + "\n"


def check_doc(doc: str) -> str:
    """The page's text; ResultFileError unless it holds the two markers, BEGIN before END."""
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ResultFileError(f"{doc}: expected the markers {BEGIN} and {END} (once each, in that order)")
    return text


def update_doc(doc: str, body: str) -> None:
    text = check_doc(doc)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(doc, "w") as f:
        f.write(f"{head}{BEGIN}\n{body}{END}{tail}")


def main(argv=None) -> int:
    p = Parser(prog="python -m bench report", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ingest", nargs="*", default=[], help="bench JSON files to copy into --results first")
    p.add_argument("--results", default=_plot.DEFAULT_RESULTS)
    p.add_argument("--doc", default=DEFAULT_DOC)
    p.add_argument("--img", default=_plot.DEFAULT_OUT)
    args = p.parse_args(argv)
    if not args.ingest:  # --ingest creates the directory
        check_results_dir(args.results, _plot.DEFAULT_RESULTS)
    check_doc(args.doc)  # before anything is copied or written
    for path in args.ingest:
        print(f"# ingested {path} -> {ingest(path, args.results)}")
    for w in _plot.plot(args.results, args.img):
        print(f"# wrote {w}")
    update_doc(args.doc, section(args.results, args.img, os.path.dirname(os.path.abspath(args.doc))))
    print(f"# updated {args.doc}")
    return 0
