"""deepkernels: FP8 blockwise GEMM, MoE dispatch/combine and MLA paged decode for PyTorch.

Every op is a ``torch.ops.deepkernels.*`` op with a CUDA kernel, a pure-torch CPU reference and a
fake kernel (torch.compile, CUDA graphs). The functions here are the checked public wrappers.
"""
from . import _ops
from .fp8 import (
    per_block_cast_from_fp8,
    per_block_cast_to_fp8,
    per_token_cast_from_fp8,
    per_token_cast_to_fp8,
)
from .gemm import (  # noqa: E402
    fp8_gemm_nt,
    get_m_alignment_for_contiguous_layout,
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from .mla import get_mla_decode_metadata, mla_decode_with_kvcache, write_mla_kv_cache

from . import moe  # noqa: E402,F401  (MoE family: ops + EPDispatcher)
from .moe import EPDispatcher, get_dispatch_layout  # noqa: E402

_ops.load_extension()

from ._ops import emulate, emulation_enabled, emulator_stats, set_emulation  # noqa: E402
from .nn.linear import Fp8Linear, convert_linears_for_fp8_training_, fp8_linear  # noqa: E402  (FP8 training)

__version__ = "0.1.0"


def is_cuda_available() -> bool:
    """True when the compiled CUDA extension is loaded and a CUDA device is present."""
    import torch

    return _ops.extension_loaded() and torch.cuda.is_available()


def build_info() -> dict:
    """How this install was built: CUDA archs, toolkit, torch it was compiled against, load status."""
    try:
        from . import _build_info as b

        info = {k: getattr(b, k, None) for k in ("CUDA_ARCHS", "CUDA_PTX_ARCHS", "CUDA_HOME", "TORCH_VERSION",
                                                  "TORCH_CUDA_VERSION")}
    except ImportError:
        info = {"CUDA_ARCHS": [], "CUDA_PTX_ARCHS": [], "CUDA_HOME": None, "TORCH_VERSION": None,
                "TORCH_CUDA_VERSION": None}
    info["CUDA_PTX_ARCHS"] = info["CUDA_PTX_ARCHS"] or []
    info["extension_loaded"] = _ops.extension_loaded()
    info["extension_error"] = _ops.extension_error()
    info["emulator"] = _ops.emulator_available()
    info["emulator_error"] = _ops.emulator_error()
    return info


__all__ = [
    "per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_token_cast_from_fp8", "per_block_cast_from_fp8",
    "is_cuda_available", "build_info", "emulate", "emulation_enabled", "emulator_stats", "set_emulation",
]
__all__ += ["get_mla_decode_metadata", "mla_decode_with_kvcache", "write_mla_kv_cache"]
__all__ += ["moe", "EPDispatcher", "get_dispatch_layout"]
__all__ += ["fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
            "get_m_alignment_for_contiguous_layout"]
__all__ += ["wgrad_gemm_fp8_fp8_fp32_nt", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt", "Fp8Linear", "fp8_linear",
            "convert_linears_for_fp8_training_"]
