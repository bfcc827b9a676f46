"""FP8 training with deepkernels (DeepSeek-V3's recipe): every linear layer's forward, dgrad and wgrad GEMMs
in e4m3 with fine-grained scales, fp32 master weights, side by side with the same model trained in bf16.

    python docs/examples/train_fp8.py [--steps 200] [--device cpu|cuda]

On a GPU the three GEMMs run the CUDA kernels (fp8_gemm_nt for forward and dgrad, wgrad_gemm_fp8_fp8_fp32_nt
for the weight gradient); on the CPU the pure-torch references (or, with DEEPKERNELS_EMULATE=1, the CUDA
kernels under the emulator: slow, use few steps). What it prints: the two loss curves, every 20 steps.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from deepkernels.nn import MLP
from deepkernels.nn.linear import Fp8Linear, convert_linears_for_fp8_training_


class Block(nn.Module):
    """A residual SwiGLU block (DeepSeek-V3's MLP) with RMSNorm."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def toy_model(d_in=128, hidden=256, intermediate=512, classes=32, layers=2) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden, bias=False), *[Block(hidden, intermediate) for _ in range(layers)],
                         nn.RMSNorm(hidden), nn.Linear(hidden, classes, bias=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    teacher = toy_model(layers=1).to(device)  # labels the toy classification task
    bf16_model = toy_model().to(device)
    fp8_model = convert_linears_for_fp8_training_(copy.deepcopy(bf16_model))  # nn.Linear -> Fp8Linear (fp32 master)
    print(f"{sum(isinstance(m, Fp8Linear) for m in fp8_model.modules())} Fp8Linear layers (fp32 master weights)")

    opt_fp8 = torch.optim.AdamW(fp8_model.parameters(), lr=2e-3)
    opt_bf16 = torch.optim.AdamW(bf16_model.parameters(), lr=2e-3)
    gen = torch.Generator(device=device).manual_seed(1)
    window_fp8 = window_bf16 = 0.0
    for step in range(1, args.steps + 1):
        x = torch.randn(args.tokens, 128, device=device, generator=gen)
        with torch.no_grad():
            labels = teacher(x).argmax(-1)

        opt_fp8.zero_grad()
        loss_fp8 = F.cross_entropy(fp8_model(x.bfloat16()).float(), labels)  # FP8 GEMMs; activations bf16
        loss_fp8.backward()  # dgrad (fp8_gemm_nt, W^T blocks) and wgrad (wgrad_gemm_fp8_fp8_fp32_nt) in FP8
        opt_fp8.step()

        opt_bf16.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss_bf16 = F.cross_entropy(bf16_model(x).float(), labels)
        loss_bf16.backward()
        opt_bf16.step()

        window_fp8 += loss_fp8.item()
        window_bf16 += loss_bf16.item()
        if step % 20 == 0:
            print(f"step {step:4d}  loss fp8 {window_fp8 / 20:.4f}  bf16 {window_bf16 / 20:.4f}  "
                  f"diff {abs(window_fp8 - window_bf16) / 20:.4f}")
            window_fp8 = window_bf16 = 0.0


if __name__ == "__main__":
    main()
