"""The README Status table claims nothing that does not exist: every row saying "yes"/"tested" names
ops/modules (the map below) that must be registered / importable, and a test file that must exist."""
import importlib
import os
import re

import torch

import deepkernels  # noqa: F401  (registers torch.ops.deepkernels.*)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# row prefix (lower case) -> (torch.ops.deepkernels op names, "module:attr" names, test files)
ROWS = {
    "fp8 casts": (["per_token_cast_to_fp8", "per_block_cast_to_fp8"], ["deepkernels:per_token_cast_to_fp8"],
                  ["tests/test_fp8.py"]),
    "fp8 blockwise gemm": (["fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked"],
                           ["deepkernels:fp8_gemm_nt", "deepkernels.nn:Fp8Linear"], ["tests/test_gemm.py"]),
    "mla paged decode": (["get_mla_decode_metadata", "mla_decode_with_kvcache", "write_mla_kv_cache"],
                         ["deepkernels:mla_decode_with_kvcache", "deepkernels.nn:PagedMLAKVCache"],
                         ["tests/test_mla.py"]),
    "moe dispatch/combine": (["moe_get_dispatch_layout", "moe_permute", "moe_unpermute_reduce"],
                             ["deepkernels.moe:EPDispatcher", "deepkernels.nn:MoE"], ["tests/test_moe.py"]),
    "deepseek-v3 model": ([], ["deepkernels.model:DeepseekV3ForCausalLM", "deepkernels.model:generate"],
                          ["tests/test_model.py"]),
    "deepseek-v2": ([], ["deepkernels.model.config:tiny_v2_config", "deepkernels.nn.moe:route"],
                    ["tests/test_model.py", "tests/test_moe.py"]),
    "mtp layers": ([], ["deepkernels.model.modeling:MTPLayer", "deepkernels.model:DeepseekV3ForCausalLM"],
                   ["tests/test_model.py"]),
    "simt emulator": ([], ["deepkernels:emulate", "deepkernels:emulator_stats"], ["tests/test_emulator.py"]),
}


def status_rows():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Status", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or set(cells[0]) <= set("- ") or cells[0] == "component":
            continue
        rows.append(cells)
    return rows


def _claims(cell: str) -> bool:
    c = cell.lower()
    return c.startswith("yes") or bool(re.search(r"(?<!not )\btested\b", c))


def test_every_row_is_known():
    rows = status_rows()
    assert rows, "no Status table in README.md"
    for cells in rows:
        assert any(cells[0].lower().startswith(k) for k in ROWS), f"unknown README status row {cells[0]!r}"


def test_claims_are_backed():
    for cells in status_rows():
        key = next(k for k in ROWS if cells[0].lower().startswith(k))
        ops, attrs, tests = ROWS[key]
        if not any(_claims(c) for c in cells[1:]):
            continue
        for op in ops:
            assert hasattr(torch.ops.deepkernels, op), f"README claims {cells[0]!r} but op {op} is missing"
        for spec in attrs:
            mod, attr = spec.split(":")
            assert hasattr(importlib.import_module(mod), attr), f"README claims {cells[0]!r}: {spec} missing"
        for t in tests:
            assert os.path.exists(os.path.join(ROOT, t)), f"README claims {cells[0]!r}: no {t}"
