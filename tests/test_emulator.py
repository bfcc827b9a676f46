"""The SIMT emulator itself: its PTX models against facts of the PTX ISA and CUTLASS's atom layouts
(tests/emulator/fidelity.cpp), and its checkers against planted kernel bugs (tests/emulator/planted_bugs.cpp).
Each C++ program is built with the host compiler and the emulator's flags and prints 'N passed, M failed'.
The kernels' own emulated runs are in the family test files (the `emu` variant of every CUDA test)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import deepkernels

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tests" / "emulator"
# The flags setup.py builds deepkernels._emu with (the kernels rely on them: see docs/design.md#emulator).
CXXFLAGS = ["-std=c++20", "-O1", "-g", "-fno-extern-tls-init", "-ffp-contract=off", "-Wno-attributes",
            "-Wno-unknown-pragmas"]
SANITIZERS = {"asan": ["-fsanitize=address", "-fno-omit-frame-pointer"], "tsan": ["-fsanitize=thread"]}


def cuda_include() -> Path:
    home = deepkernels.build_info()["CUDA_HOME"]
    if home is None or not (Path(home) / "include" / "cuda_fp8.h").is_file():
        if os.environ.get("DEEPKERNELS_REQUIRE_CUDA") == "1":
            pytest.fail("DEEPKERNELS_REQUIRE_CUDA=1 but no CUDA headers to build the emulator tests")
        pytest.skip("no CUDA headers (the emulator needs the toolkit's headers)")
    return Path(home) / "include"


def build(name: str, tmp_path_factory, sanitizer: str | None = None) -> Path:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.fail(f"no host C++ compiler ({cxx})")
    out = tmp_path_factory.mktemp("emu") / (name + (f"-{sanitizer}" if sanitizer else ""))
    cmd = [cxx, *CXXFLAGS, *SANITIZERS.get(sanitizer, []), f"-I{ROOT / 'csrc'}", f"-I{cuda_include()}",
           str(SRC / f"{name}.cpp"), str(ROOT / "csrc" / "emulator" / "runtime.cpp"), "-o", str(out), "-lpthread"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"building {name}:\n{' '.join(cmd)}\n{result.stderr[-4000:]}"
    return out


def run(binary: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_all_passed(result: subprocess.CompletedProcess, what: str) -> int:
    tail = result.stdout[-6000:] + result.stderr[-3000:]
    match = re.search(r"^(\d+) passed, (\d+) failed$", result.stdout, re.M)
    assert match is not None, f"{what}: no closing line\n{tail}"
    passed, failed = int(match.group(1)), int(match.group(2))
    assert result.returncode == 0 and failed == 0 and passed > 0, f"{what}: {passed} passed, {failed} failed\n{tail}"
    return passed


# ---- the checkers against planted bugs (tests/emulator/planted_bugs.cpp): each case plants bugs in small
# kernels (every error must name the kernel, the CTA and the barrier / collective) and runs their fixed twins.
PLANTED_CASES = ["deadlock_parity", "deadlock_sync_vs_shfl", "deadlock_sync_vs_mbar", "deadlock_missing_arrive",
                 "divergent_shfl_ldmatrix", "divergent_sync_sites", "cp_async", "wgmma", "tma_store", "named_barrier",
                 "race_schedules"]
# The expected deadlock reports are those of the default round-robin schedule (race_schedules sets its own).
PLANTED_ENV = {"DEEPKERNELS_EMULATE_SCHEDULE": "rr"}
# detect_leaks=0: the emulator never frees its fiber stacks (a leak report would fail every run).
PLANTED_ASAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0"}


@pytest.fixture(scope="module")
def planted_bugs_bin(tmp_path_factory) -> Path:
    return build("planted_bugs", tmp_path_factory)


def _planted_sanitizer_build(sanitizer: str, tmp_path_factory) -> Path:
    """planted_bugs.cpp built with `sanitizer`; skipped (failed under DEEPKERNELS_REQUIRE_CUDA=1) when the host
    compiler has no runtime for it, or its runtime cannot start here."""
    cxx = os.environ.get("CXX", "g++")
    probe = tmp_path_factory.mktemp("probe") / f"probe_{sanitizer}"
    probe.with_suffix(".cpp").write_text("int main() { return 0; }\n")
    made = subprocess.run([cxx, *SANITIZERS[sanitizer], str(probe.with_suffix(".cpp")), "-o", str(probe)],
                          capture_output=True, text=True) if shutil.which(cxx) else None
    ran = run(probe, env=PLANTED_ASAN_ENV) if made is not None and made.returncode == 0 else None
    if ran is None or ran.returncode != 0:
        why = (made.stderr if made is not None and made.returncode != 0 else ran.stderr if ran else "no compiler")
        msg = f"{cxx} cannot build and run a {SANITIZERS[sanitizer][0]} program: {why[-400:]}"
        if os.environ.get("DEEPKERNELS_REQUIRE_CUDA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return build("planted_bugs", tmp_path_factory, sanitizer=sanitizer)


@pytest.fixture(scope="module")
def planted_bugs_asan(tmp_path_factory) -> Path:
    return _planted_sanitizer_build("asan", tmp_path_factory)


@pytest.fixture(scope="module")
def planted_bugs_tsan(tmp_path_factory) -> Path:
    return _planted_sanitizer_build("tsan", tmp_path_factory)


@pytest.mark.parametrize("case", PLANTED_CASES)
def test_planted_bugs(planted_bugs_bin, case):
    """Deadlocks (mbarrier parity, __syncthreads against a warp collective / an mbarrier, a missing arrive),
    divergent collectives (__shfl_xor_sync / ldmatrix, wgmma descriptors, __syncthreads call sites), missing
    waits (cp.async and wgmma: 0xFF / NaN-poison reads, unwaited at exit, no wgmma.fence), TMA stores (no
    fence.proxy.async: stale data stored; the source overwritten before wait_group.read; never waited / committed),
    named barriers (a warp at another warpgroup's bar.sync: deadlock), and a shared-memory race shown by the lo / hi
    schedules: each reported, each fixed twin clean and right."""
    assert_all_passed(run(planted_bugs_bin, case, env=PLANTED_ENV), f"planted bugs: {case}")


def test_planted_bugs_default_run_has_every_case(planted_bugs_bin):
    passed = assert_all_passed(run(planted_bugs_bin, env=PLANTED_ENV), "planted bugs (all cases)")
    assert passed == sum(assert_all_passed(run(planted_bugs_bin, c, env=PLANTED_ENV), c) for c in PLANTED_CASES)


def test_planted_bugs_known_false_positive(planted_bugs_bin):
    """One source-level __syncthreads that GCC's jump threading duplicates into two call sites is one barrier:
    __syncthreads phases are told apart by source location, not return address."""
    assert_all_passed(run(planted_bugs_bin, "known_false_positive", env=PLANTED_ENV), "jump-threaded __syncthreads")


@pytest.mark.parametrize("kind, report, kernel", [("global", "heap-buffer-overflow", "gather_shifted"),
                                                  ("smem", "use-after-poison", "smem_neighbour")])
def test_planted_bugs_asan(planted_bugs_asan, kind, report, kernel):
    """memcheck: one past a std::vector's end (global) and one past the launch's dynamic shared memory size
    (poisoned by the emulator) each abort with ASan's report; the in-bounds twins exit cleanly. One launch per
    process: see test_planted_bugs_asan_fibers."""
    bad = run(planted_bugs_asan, f"asan_{kind}_oob", env=PLANTED_ASAN_ENV)
    assert bad.returncode != 0 and "ERROR: AddressSanitizer: " + report in bad.stderr, bad.stderr[-3000:]
    assert f"planted::{kernel}" in bad.stderr, bad.stderr[-3000:]
    good = run(planted_bugs_asan, f"asan_{kind}_ok", env=PLANTED_ASAN_ENV)
    assert "AddressSanitizer" not in good.stderr, good.stderr[-3000:]
    assert_all_passed(good, f"asan_{kind}_ok")


def test_planted_bugs_asan_fibers(planted_bugs_asan):
    """Several launches on one OS thread, and a checker's exception thrown on a fiber, stay clean under ASan
    (fiber switches annotated with __sanitizer_start/finish_switch_fiber; reused stacks unpoisoned)."""
    for args in (["asan_global_ok", "asan_smem_ok"], ["asan_checker_error"]):
        result = run(planted_bugs_asan, *args, env=PLANTED_ASAN_ENV)
        assert "AddressSanitizer" not in result.stderr, f"{args}: {result.stderr[-3000:]}"
        assert_all_passed(result, " ".join(args))


def test_planted_race_tsan(planted_bugs_tsan):
    """racecheck through ThreadSanitizer: thread 0 writes shared memory that thread 32 reads with no barrier.
    The twin (with __syncthreads) must run cleanly; the race is reported only once the runtime tells TSan about
    its fibers (__tsan_create_fiber / __tsan_switch_to_fiber no_sync, __tsan_acquire / __tsan_release at the
    emulated barriers, collectives and mbarriers), so it is reported with both sites under any schedule."""
    good = run(planted_bugs_tsan, "tsan_norace")
    assert "ThreadSanitizer" not in good.stderr, good.stderr[-3000:]
    assert_all_passed(good, "tsan_norace")
    bad = run(planted_bugs_tsan, "tsan_race")
    assert "ThreadSanitizer: data race" in bad.stderr, bad.stderr[-3000:]
    assert bad.returncode != 0 and "planted::smem_handoff" in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.count("planted_bugs.cpp:") >= 2, "both sites of the race: " + bad.stderr[-3000:]


def test_planted_bugs_tsan_no_false_positives(planted_bugs_tsan):
    """Every checker case under ThreadSanitizer (but race_schedules, which launches planted races): the same
    results, and no race report: the kernels' planted bugs are not races, so any report is the emulator's own.
    (deadlock_sync_vs_shfl is left out: its planted divergence is also a real race -- threads 16-31 read what
    threads 0-15 wrote with no barrier between -- which TSan rightly reports.)"""
    cases = [c for c in PLANTED_CASES if c not in ("race_schedules", "deadlock_sync_vs_shfl")]
    result = run(planted_bugs_tsan, *cases, env=PLANTED_ENV)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert_all_passed(result, "planted bugs under TSan")


def test_fidelity(tmp_path_factory):
    """The emulated PTX primitives against documented facts (tests/emulator/fidelity.cpp): mma.sync m16n8k16 and
    ldmatrix fragments (PTX ISA tables and, independently, CuTe's SM80 / SM75 atom layouts), wgmma operands
    through matrix descriptors and its D fragment (CUTLASS CLayout_64xN), the descriptor's fields and canonical
    layouts (ISA table, worked examples, CUTLASS make_gmma_desc), TMA swizzle / out-of-bounds zero fill / full-box
    transaction bytes, and mbarrier phases and parity."""
    binary = build("fidelity", tmp_path_factory)
    assert_all_passed(run(binary, timeout=120), "fidelity")
