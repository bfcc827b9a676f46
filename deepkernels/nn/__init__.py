"""Drop-in torch.nn modules built on the deepkernels ops."""
from .linear import Fp8Linear
from .mlp import MLP, make_linear
from .moe import MoE, MoEGate

__all__ = ["Fp8Linear", "MLP", "make_linear"]
from .mla import PagedMLAKVCache, mla_decode_absorbed

__all__ += ["PagedMLAKVCache", "mla_decode_absorbed"]
__all__ += ["MoE", "MoEGate"]
