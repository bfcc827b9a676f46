"""bench: `python -m bench plot` on synthetic results, and the JSON schema of a CPU quant run."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = ("device", "driver", "torch", "cuda", "commit", "date")
ROW_KEYS = ("family", "case", "metric", "ours", "peer", "peer_value", "ratio", "ms")


def _synthetic():
    rows = [
        {"family": "gemm", "case": {"kind": "dense", "m": 128, "n": 7168, "k": 2048}, "metric": "TFLOPS",
         "ours": 500.0, "peer": "torch._scaled_mm", "peer_value": 450.0, "ratio": 1.11, "ms": 0.1},
        {"family": "quant", "case": {"op": "per_token", "m": 4096, "k": 7168}, "metric": "GB/s",
         "ours": 2000.0, "peer": None, "peer_value": None, "ratio": None, "ms": 0.02},
        {"family": "moe", "case": {"tokens": 4096, "op": "ep_dispatch_fp8"}, "metric": "GB/s",
         "ours": 300.0, "peer": "all_to_all_single alone", "peer_value": 320.0, "ratio": 0.94, "ms": 0.3},
    ]
    for sk in (512, 1024, 4096):
        rows.append({"family": "mla", "case": {"b": 64, "s_q": 1, "h_q": 128, "mean_sk": sk, "page": 64},
                     "metric": "TFLOPS", "ours": 300.0, "peer": None, "peer_value": None, "ratio": None,
                     "ms": 0.1, "extra": {"GB/s": 2500.0, "TFLOPS": 300.0, "peak_GB/s": 3350.0}})
    return {"device": "NVIDIA H100 80GB HBM3", "driver": "570.0", "torch": "2.x", "cuda": "13.0",
            "commit": "abc", "date": "2026-01-01T00:00:00+00:00", "results": rows}


def test_plot_writes_pngs(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "h100-2026-01-01.json").write_text(json.dumps(_synthetic()))
    (res / "cpu-smoke.json.tmp").write_text("not json: must be ignored")
    out = tmp_path / "img"
    proc = subprocess.run([sys.executable, "-m", "bench", "plot", "--results", str(res), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == [f"h100-2026-01-01-{f}.png" for f in ("gemm", "mla", "moe", "quant")]
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_plot_no_results(tmp_path):
    from bench import plot

    assert plot.plot(str(tmp_path), str(tmp_path / "img")) == []


def test_quant_cpu_json_schema(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "quant", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for key in ENV_KEYS:
        assert key in data, key
    assert data["results"], "no rows"
    for row in data["results"]:
        for key in ROW_KEYS:
            assert key in row, key
        assert row["family"] == "quant" and isinstance(row["case"], dict)


def test_report_ingest_plots_and_targets(tmp_path):
    from bench import report

    data = _synthetic()
    data["results"].append({"family": "gemm", "case": {"kind": "dense", "m": 4096, "n": 7168, "k": 2048},
                            "metric": "TFLOPS", "ours": 800.0, "peer": "torch._scaled_mm", "peer_value": 800.0,
                            "ratio": 1.0, "ms": 0.2})
    data["results"].append({"family": "gemm", "case": {"kind": "dense", "m": 4096, "n": 7168, "k": 2048,
                                                       "kernel": "sm90"}, "metric": "TFLOPS", "ours": 900.0,
                            "peer": None, "peer_value": None, "ratio": None, "ms": 0.18})
    data["results"].append({"family": "gemm", "case": {"kind": "contiguous", "groups": 4, "m": 1024, "n": 7168,
                                                       "k": 2048}, "metric": "TFLOPS", "ours": 760.0, "peer": None,
                            "peer_value": None, "ratio": None, "ms": 0.2})
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(data))
    doc = tmp_path / "performance.md"
    doc.write_text(f"# head\n\nkept\n\n{report.BEGIN}\nold text\n{report.END}\n\ntail kept\n")
    res, img = tmp_path / "results", tmp_path / "img"
    assert report.main(["--ingest", str(src), "--results", str(res), "--doc", str(doc), "--img", str(img)]) == 0
    assert sorted(p.name for p in res.iterdir()) == ["nvidia-h100-80gb-hbm3-2026-01-01.json"]
    text = doc.read_text()
    assert text.startswith("# head\n\nkept\n") and text.endswith("tail kept\n") and "old text" not in text
    for needle in ("| NVIDIA H100 80GB HBM3 | 570.0 | 2.x | 13.0 | abc |", "#### gemm", "#### mla",
                   "![gemm on NVIDIA H100 80GB HBM3](img/nvidia-h100-80gb-hbm3-2026-01-01-gemm.png)",
                   "| GEMM dense >= 1.2x torch._scaled_mm | kind=dense m=128 n=7168 k=2048 | 1.11x | **no** |",
                   "| GEMM dense >= 1.1x torch._scaled_mm | kind=dense m=4096 n=7168 k=2048 | 1.00x | **no** |",
                   "| GEMM dense >= 1.1x torch._scaled_mm | kind=dense m=4096 n=7168 k=2048 kernel=sm90 | 1.12x | yes |",
                   "| GEMM grouped within 10% of dense at equal total M | kind=contiguous groups=4 m=1024 n=7168 "
                   "k=2048 | 0.95x dense | yes |"):
        assert needle in text, (needle, text)
    again = doc.read_text()
    report.main(["--results", str(res), "--doc", str(doc), "--img", str(img)])
    assert doc.read_text() == again, "report is not idempotent"


def test_report_refuses_cpu_runs_and_missing_markers(tmp_path):
    from bench import report

    cpu = dict(_synthetic(), device="cpu (x86_64, 2 cores)")
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    with pytest.raises(ValueError, match="CPU run"):
        report.ingest(str(tmp_path / "cpu.json"), str(tmp_path / "res"))
    (tmp_path / "bad.json").write_text(json.dumps({"device": "x"}))
    with pytest.raises(ValueError, match="not a bench result"):
        report.ingest(str(tmp_path / "bad.json"), str(tmp_path / "res"))
    doc = tmp_path / "p.md"
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.update_doc(str(doc), "x")


def _bad_cli_cases(tmp):
    """(args, exit code, message regex): exit 2 for a bad flag / value, 1 for a file that cannot be used."""
    (tmp / "res").mkdir()
    (tmp / "res" / "x.json").write_text("{not json")
    (tmp / "rows").mkdir()
    (tmp / "rows" / "y.json").write_text(json.dumps(dict(_synthetic(), results=[{"family": 3}])))
    (tmp / "afile").write_text("no markers")
    (tmp / "good").mkdir()
    (tmp / "good" / "h100.json").write_text(json.dumps(_synthetic()))
    doc = tmp / "perf.md"
    doc.write_text("# perf\n<!-- results:begin -->\nold\n<!-- results:end -->\n")
    img = str(tmp / "img")
    return [
        (["plot", "--bogus"], 2, r"unrecognized arguments: --bogus \(see python -m bench plot --help\)"),
        (["plot", "--results"], 2, r"argument --results: expected one argument"),
        (["plot", "--results", str(tmp / "nope"), "--out", img], 1,
         r"--results: expected a directory .*no such directory"),
        (["plot", "--results", str(tmp / "res"), "--out", img], 1, r"x\.json: not a bench result: expected JSON, got "
                                                                  r"invalid JSON"),
        (["plot", "--results", str(tmp / "rows"), "--out", img], 1, r"y\.json: not a bench result: results\[0\]\."
                                                                   r"family: expected a str, got int"),
        (["report", "--bogus"], 2, r"unrecognized arguments: --bogus \(see python -m bench report --help\)"),
        (["report", "--doc"], 2, r"argument --doc: expected one argument"),
        (["report", "--results", str(tmp / "good"), "--doc", str(tmp / "afile"), "--img", img], 1,
         r"afile: expected the markers"),
        (["report", "--ingest", str(tmp / "res" / "x.json"), "--results", str(tmp / "r"), "--doc", str(doc),
          "--img", img], 1, r"x\.json: not a bench result"),
        (["report", "--ingest", str(tmp / "missing.json"), "--results", str(tmp / "r"), "--doc", str(doc)], 1,
         r"FileNotFoundError: .*missing\.json"),
        (["sweep", "--bogus"], 2, r"unrecognized arguments: --bogus \(see python -m bench sweep --help\)"),
        (["sweep", "--budget-s", "-1"], 2, r"--budget-s: expected a positive number of seconds, got -1"),
        (["sweep", "--device", "bogus"], 2, r"--device: expected cpu or cuda\[:N\], got 'bogus'"),
        (["sweep", "--families", "gemm,nope"], 2, r"--families: expected names from .*got \['nope'\]"),
    ]


def test_plot_and_report_cli_errors_are_one_line(tmp_path):
    """`python -m bench plot|report|sweep` as the other CLIs: one `error: ...` line naming the flag or file, exit 2
    (flags / values) or 1 (files), no usage block, no traceback, nothing written."""
    cases = _bad_cli_cases(tmp_path)
    doc_before = (tmp_path / "perf.md").read_text()
    procs = [(args, rc, msg, subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
             for args, rc, msg in cases]
    for args, rc, msg, proc in procs:
        out, err = proc.communicate(timeout=180)
        case = f"{' '.join(args)}: rc {proc.returncode}, stderr {err!r}"
        assert proc.returncode == rc, case
        assert err.startswith("error: ") and err.count("\n") == 1, case
        assert "usage:" not in err and "Traceback" not in err, case
        assert re.search(msg, err), case
    assert (tmp_path / "perf.md").read_text() == doc_before
    assert not (tmp_path / "img").exists() and not (tmp_path / "r").exists(), "a refused run wrote something"


def test_performance_page_has_report_markers():
    from bench import report

    text = open(os.path.join(ROOT, "docs", "performance.md")).read()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert text.index(report.BEGIN) < text.index(report.END)


def test_gemm_bench_refuses_to_time_a_wrong_kernel(monkeypatch):
    """Each kernel variant's result is checked against the reference before it is timed."""
    import torch

    from bench import common, gemm

    monkeypatch.setattr(gemm, "kernel_variants", lambda ctx, flag: [("default", common.env_var(flag, None)),
                                                                    ("broken", common.env_var(flag, "1"))])
    ctx = common.Context(device=torch.device("cpu"), quick=True, warmup=0, repeats=1)
    good = torch.randn(16, 32)

    def call():
        return good + 1 if os.environ.get("DEEPKERNELS_GEMM_SM90") == "1" else good

    rows = gemm._timed(ctx, {"kind": "dense", "m": 16, "n": 32, "k": 16}, 2 * 16 * 32 * 16, call, lambda: good)
    assert [r.case.get("kernel") for r in rows] == [None, "broken"]
    assert rows[0].ours > 0 and rows[0].extra["calc_diff_vs_reference"] == 0
    assert rows[1].ours == 0 and "wrong result" in rows[1].extra["error"] and rows[1].ms is None
    assert "DEEPKERNELS_GEMM_SM90" not in os.environ


def test_gemm_cpu_smoke_has_training_gemm_rows_beside_a_peer(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "gemm", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["case"]["kind"]: r for r in json.loads(out.read_text())["results"]}
    assert {"dense", "contiguous", "masked", "wgrad", "k_grouped_wgrad"} <= rows.keys(), rows.keys()
    for kind in ("wgrad", "k_grouped_wgrad"):
        r = rows[kind]
        assert r["ours"] > 0 and r["peer"].startswith("torch.matmul") and r["peer_value"] > 0 and r["ratio"] > 0, r
        assert r["extra"]["calc_diff_vs_reference"] < 1e-4, r


def test_moe_cpu_smoke_has_low_latency_rows(tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "moe", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    ops = {r["case"]["op"]: r for r in rows}
    assert {"permute_fp8", "unpermute_reduce", "ll_dispatch_fp8", "ll_combine_bf16"} <= ops.keys(), ops.keys()
    for op in ("ll_dispatch_fp8", "ll_combine_bf16"):
        r = ops[op]
        assert r["case"]["mode"] == "low_latency" and r["ours"] > 0 and r["peer_value"] > 0
        assert r["extra"]["collectives"] == 1 and r["extra"]["wire_MB"] > 0


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_moe_multi_process_gloo_smoke(mode):
    """The multi-GPU end-to-end path, run over gloo on the CPU with 2 processes."""
    from bench import moe

    rows = moe.run_multi_device(2, "gloo", (8, 256, 2, 8), repeats=1, timeout=120, mode=mode)
    prefix = "ep_ll" if mode == "low_latency" else "ep"
    assert [r.case["op"] for r in rows] == [f"{prefix}_dispatch_fp8", f"{prefix}_combine_bf16"]
    assert all(r.ours > 0 and r.peer_value > 0 and r.ms > 0 for r in rows)


def test_emu_vs_gpu_compares_and_runs_emulated_side():
    """bench/emu_vs_gpu.py (the gpu_check step that checks the emulator against the hardware): its comparison
    tells bitwise, accumulation-order and real differences apart, and every case runs emulated here."""
    import torch

    import deepkernels
    from bench import emu_vs_gpu

    x = torch.randn(64, 64)
    assert emu_vs_gpu.compare((x,), (x.clone(),), "exact")["ok"]
    nudged = x * (1 + 2.0 ** -10)
    assert not emu_vs_gpu.compare((x,), (nudged,), "exact")["ok"]
    assert emu_vs_gpu.compare((x,), (nudged,), "accumulation")["ok"]
    assert not emu_vs_gpu.compare((x,), (x * 1.05,), "accumulation")["ok"]
    if not deepkernels.build_info()["emulator"]:
        return
    before = deepkernels.emulator_stats()["kernels"]
    assert emu_vs_gpu.main([]) == 0
    ran = {k for k, v in deepkernels.emulator_stats()["kernels"].items() if v > before.get(k, 0)}
    assert {"fp8_gemm_nt_portable_kernel", "fp8_gemm_sm90_kernel", "mla_splitkv_kernel", "mla_splitkv_sm90_kernel",
            "mla_combine_kernel", "mla_metadata_kernel", "mla_write_cache_kernel", "layout_kernel",
            "permute_kernel", "permute_fp8_kernel", "unpermute_reduce_kernel", "per_token_cast_to_fp8_kernel",
            "per_block_cast_to_fp8_kernel", "cast_from_fp8_kernel"} <= ran, ran


# ------------------------------------------------------------------------------------------------
# bench model: the transformers peer is measured as its users run it (generate, default cache)

def _tiny_pair():
    import torch

    pytest.importorskip("transformers")
    from deepkernels.model import load_model
    from deepkernels.model.hf import to_transformers

    model = load_model("tiny")
    return model, to_transformers(model, "eager"), torch.randint(0, 1024, (2, 6), generator=torch.Generator()
                                                                  .manual_seed(0))


def test_model_peer_decodes_through_its_cache():
    """An uncached peer (the full sequence recomputed per token, or a cache that is not passed on) fails here:
    after the prefill every forward of transformers' generate must see one new token per sequence and a
    past_key_values already holding the prompt and the tokens so far; and it makes the same tokens as ours."""
    import torch

    from bench import model as bench_model
    from deepkernels.model import generate

    model, hf, ids = _tiny_pair()
    calls = []
    forward = hf.forward

    def spy(*args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.x calls it ``cache``
        calls.append((tuple(input_ids.shape), None if past is None else past.get_seq_length()))
        return forward(*args, **kwargs)

    hf.forward = spy
    out = bench_model.transformers_generate_fn(hf, ids)(5)
    assert out.shape == (2, 11)
    assert len(calls) == 5, calls  # one prefill + 4 decode steps
    assert calls[0][0] == (2, 6)
    for step, (shape, cached) in enumerate(calls[1:]):
        assert shape == (2, 1), f"decode step {step} fed {shape}: not a cached decode"
        assert cached == 6 + step, f"decode step {step}: cache holds {cached} tokens, expected {6 + step}"
    assert torch.equal(out, generate(model, ids, max_new_tokens=5))
    assert torch.equal(bench_model.ours_generate_fn(model, ids)(5), out)


def test_model_time_generate_rejects_an_early_stop():
    import torch

    from bench import model as bench_model
    from bench.common import Context

    ids = torch.zeros(2, 4, dtype=torch.long)
    ctx = Context(device=torch.device("cpu"), warmup=0, repeats=1)
    def fake(n, stamp, made=None):
        for _ in range(n if made is None else made):
            time.sleep(0.001)
            stamp()
        return torch.zeros(2, 4 + (n if made is None else made), dtype=torch.long)

    with pytest.raises(RuntimeError, match="stopped early"):
        bench_model.time_generate(lambda n, stamp: fake(n, stamp, made=n - 1), ids, 3, ctx)
    prefill, decode = bench_model.time_generate(fake, ids, 3, ctx)
    assert prefill >= 0.001 and decode >= 0.003  # 1 sleep before the first stamp, 3 more up to the last


def test_model_timing_stamps_every_token():
    """Both generate functions call stamp() once per new token, in order."""
    from bench import model as bench_model

    model, hf, ids = _tiny_pair()
    for fn in (bench_model.transformers_generate_fn(hf, ids), bench_model.ours_generate_fn(model, ids)):
        stamps = []
        out = fn(4, lambda: stamps.append(time.perf_counter()))
        assert out.shape == (2, 10) and len(stamps) == 4 and stamps == sorted(stamps)


def test_model_bench_rows_batch_1_and_8(monkeypatch):
    """`python -m bench model` on the CPU: prefill and decode rows at batch 1 and 8, ours and the peer."""
    import math

    import torch

    pytest.importorskip("transformers")
    from bench import model as bench_model
    from bench.common import Context

    monkeypatch.setattr(bench_model, "CPU_CASES", [(1, 8), (8, 8)])
    rows = bench_model.run(Context(device=torch.device("cpu"), quick=True, warmup=0, repeats=1))
    got = {(r.case["batch"], r.case["phase"]) for r in rows}
    assert got == {(1, "prefill"), (1, "decode"), (8, "prefill"), (8, "decode")}, got
    for r in rows:
        assert r.metric == "tokens/s" and math.isfinite(r.ours) and r.ours > 0
        assert r.peer.startswith("transformers generate") and r.peer_value > 0


# ------------------------------------------------------------------------------------------------
# packaging: the demo (and the bench it runs) from an installed package, outside the checkout

def test_demo_runs_from_an_installed_package(tmp_path):
    """A pure-Python install (DEEPKERNELS_SKIP_CUDA=1) into a fresh --target directory, then
    `python -m deepkernels.demo` and `python -m bench` run from a directory outside the checkout: the wheel
    ships the bench package the demo imports."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "results", "_build_info.py", "*.egg-info")
    for d in ("deepkernels", "bench"):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=skip)
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEEPKERNELS_EMULATE")}
    env.update(DEEPKERNELS_SKIP_CUDA="1", DEEPKERNELS_SKIP_EMULATOR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(src)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "bench" / "__main__.py").exists() and (site / "deepkernels" / "demo.py").exists()
    assert not list(site.glob("deepkernels/_C*")), "a pure-Python install built an extension"
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import deepkernels, bench; print(deepkernels.__file__); "
                            "print(bench.__file__)"], capture_output=True, text=True, env=env, cwd=run_dir,
                           timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    demo = subprocess.run([sys.executable, "-m", "deepkernels.demo", "--device", "cpu", "--max-new-tokens", "3",
                           "--bench", "quant"], capture_output=True, text=True, env=env, cwd=run_dir, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "tokens/s" in demo.stdout and "per_token_cast_to_fp8" in demo.stdout
    assert "quant" in demo.stdout and "# wrote" in demo.stdout
    assert list((run_dir / "bench-results").glob("*.json*")), "bench results not written under the cwd"
    bad = subprocess.run([sys.executable, "-m", "bench", "nope"], capture_output=True, text=True, env=env,
                         cwd=run_dir, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_sweep_emulator_smoke_runs_every_variant(tmp_path):
    """`python -m bench sweep` with no GPU: every GEMM plan (portable, the sm_90a heuristic's, each block shape x
    split-K, the shallowest ring), every MLA variant and both MoE pack variants run under the emulator and agree
    with the references; nothing is timed and no table is written."""
    import deepkernels
    from deepkernels import gemm, mla
    from deepkernels.moe import wire

    if not deepkernels.build_info()["emulator"]:
        pytest.fail(f"the emulator is not built: {deepkernels.build_info()['emulator_error']}")
    out = tmp_path / "sweep.json"
    table = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "sweep", "--device", "cpu", "--quick", "--out", str(out),
                           "--table", str(table)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results and all(r["ok"] and r["us"] is None for r in results), [r for r in results if not r["ok"]]
    assert not table.exists()
    labels = {(r["family"], r["variant"]) for r in results}
    gemm_labels = {v for f, v in labels if f == "gemm"}
    assert {"portable", "sm90 heuristic"} <= gemm_labels
    for block_m, block_n in gemm._SM90_SHAPES:
        assert {f"sm90 {block_m},{block_n},{s}" for s in (1, 2, 4, 8)} <= gemm_labels, (block_m, block_n)
        assert f"sm90 {block_m},{block_n},1,2" in gemm_labels
        if (block_m, block_n) != (128, 128):
            assert {f"sm90 {block_m},{block_n},{s},0,1" for s in (1, 2)} <= gemm_labels
            assert f"sm90 {block_m},{block_n},1,0,1,1" in gemm_labels  # TMA store + overlapped promotion
        assert f"sm90 {block_m},{block_n},1,0,0,1" in gemm_labels  # the TMA-store epilogue
    ran = {(r["extra"]["block_m"], r["extra"]["block_n"], r["extra"]["split_k"], r["extra"]["overlap"],
            r["extra"]["tma_store"]) for r in results if r["family"] == "gemm" and r["extra"].get("kernel") == "sm90"}
    assert len(ran) == len(gemm._SM90_SHAPES) * 8 - 3, "each forced plan is the one that launched"
    kinds = {r["case"]["kind"] for r in results if r["family"] == "gemm"}
    assert kinds == {"dense", "masked", "contiguous"}, f"the grouped MoE GEMMs are swept too, got {kinds}"
    assert any(r["extra"].get("split_k", 1) > 1 for r in results if r["case"].get("kind") == "masked"), "masked split-K"
    assert {v for f, v in labels if f == "mla"} == {n for n, d in mla.MLA_VARIANTS.items() if torch.bfloat16 in d}
    assert {v for f, v in labels if f == "moe"} == set(wire._PACK_VARIANTS)


def test_sweep_table_writer_keeps_other_devices(tmp_path):
    from bench import sweep

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": 1, "entries": [{"device": "A", "m": 1}, {"device": "B", "m": 2}]}))
    sweep.write_table(str(path), "B", [{"device": "B", "m": 3}])
    entries = json.loads(path.read_text())["entries"]
    assert entries == [{"device": "A", "m": 1}, {"device": "B", "m": 3}]
    proc = subprocess.run([sys.executable, "-m", "bench", "sweep", "--families", "gemm,bogus", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--families: expected names from" in proc.stderr
