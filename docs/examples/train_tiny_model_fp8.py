"""FP8 training of a tiny DeepSeek-V3 (deepkernels.model: MLA + MoE) beside the same model trained with bf16
GEMMs, on a toy next-token task (arithmetic progressions mod the vocabulary).

    python docs/examples/train_tiny_model_fp8.py [--steps 200] [--device cpu|cuda]

``convert_linears_for_fp8_training_`` turns every nn.Linear but the LM head into an FP8 training Fp8Linear
(fp32 master weight; forward, dgrad and wgrad GEMMs in e4m3 with 1x128 / 128x128 scales, DeepSeek-V3's
recipe); embeddings, norms, the router and attention's softmax stay in the model's precision, as in
DeepSeek-V3. The MoE layer trains through ``deepkernels.moe.autograd`` (permute -> experts -> weighted
unpermute-reduce, all differentiable); gradients reach the router through the top-k weights.
What it prints: the two loss curves (20-step means) and the cosine between the two runs' gradients.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import deepkernels
from deepkernels.model import DeepseekV3ForCausalLM
from deepkernels.model.config import DeepseekV3Config


def tiny_config() -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_nextn_predict_layers=0, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.0, kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16,
        v_head_dim=32, qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, max_position_embeddings=256, rope_scaling=None, bos_token_id=0, eos_token_id=1)


def toy_batch(gen: torch.Generator, batch: int, length: int, vocab: int, device) -> torch.Tensor:
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    stride = torch.tensor([1, 3, 5, 7])[torch.randint(0, 4, (batch, 1), generator=gen)]
    return ((start + stride * torch.arange(length)) % vocab).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU references run many small ops: one thread is faster

    cfg = tiny_config()
    torch.manual_seed(0)
    bf16_model = DeepseekV3ForCausalLM(cfg).to(device)
    fp8_model = deepkernels.convert_linears_for_fp8_training_(copy.deepcopy(bf16_model),
                                                              keep=lambda name, linear: name == "lm_head")
    print(f"{sum(isinstance(m, deepkernels.Fp8Linear) for m in fp8_model.modules())} Fp8Linear layers "
          f"(fp32 master weights)")

    opt_fp8 = torch.optim.AdamW(fp8_model.parameters(), lr=1e-3)
    opt_bf16 = torch.optim.AdamW(bf16_model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)

    def loss_of(model, ids):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), ids[:, 1:].reshape(-1))

    window_fp8 = window_bf16 = 0.0
    for step in range(1, args.steps + 1):
        ids = toy_batch(gen, 8, 17, cfg.vocab_size, device)
        opt_fp8.zero_grad()
        loss_fp8 = loss_of(fp8_model, ids)  # FP8 forward GEMMs
        loss_fp8.backward()                 # FP8 dgrad (fp8_gemm_nt) and wgrad (wgrad_gemm_fp8_fp8_fp32_nt)
        opt_fp8.step()

        opt_bf16.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):  # bf16 GEMMs
            loss_bf16 = loss_of(bf16_model, ids)
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
