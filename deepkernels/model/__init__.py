"""DeepSeek-V3 (V2/V2-Lite/V2.5/R1 share the architecture) on deepkernels: config, model, HF checkpoint
loading, generate, MTP speculative decoding.

    from deepkernels.model import DeepseekV3Config, DeepseekV3ForCausalLM, load_model, generate
    model = load_model("path/to/hf_dir" or "tiny", device="cpu", dtype=torch.float32)
    logits = model(input_ids)                            # [B, T, vocab], full sequence, no cache
    out = generate(model, input_ids, max_new_tokens=16)  # greedy by default; paged MLA cache
    model = load_model("tiny", load_mtp=True)            # + the MTP layer(s)
    drafts = model.mtp_logits(input_ids)                 # [B, T - 1, vocab]: entry i drafts token i + 2
    out = generate(model, input_ids, use_mtp=True)       # greedy speculative decoding, same tokens
"""
from .config import DeepseekV3Config
from .generation import GenerationStats, generate, sample_next_token
from .config import CheckpointNotFoundError
from .loading import CheckpointError, load_model, load_tokenizer, save_pretrained
from .modeling import DeepseekV3ForCausalLM

__all__ = ["DeepseekV3Config", "DeepseekV3ForCausalLM", "generate", "GenerationStats", "sample_next_token",
           "load_model", "save_pretrained", "load_tokenizer", "CheckpointError",
           "CheckpointNotFoundError"]
