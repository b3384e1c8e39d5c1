"""Prune tiny random models of several families with one call each (runs offline in seconds).

python examples/prune_any_architecture.py
"""

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig, OPTConfig

from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, tier_maps

CONFIGS = {
    "llama": LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    ),
    "opt": OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        vocab_size=128,
    ),
    "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0),
    "mixtral": MixtralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        vocab_size=128,
    ),
}


def main() -> None:
    config = HybridSparseConfig(
        method="wanda", pattern="hybrid", tier_ratios=(0.35, 0.45, 0.20), nsamples=8, seqlen=64
    )
    calibration = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    for family, model_config in CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config)
        report = apply_hybrid_sparsity(model, config, calibration)
        maps = tier_maps(model)
        print(
            f"{family:8s} {report.sparsity:.2%} sparse, {len(maps)} tier maps, tiers {report.tier_totals()}"
        )


if __name__ == "__main__":
    main()
