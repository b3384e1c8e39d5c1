"""Tiny randomly initialised causal LMs of every family the design names (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
)

VOCAB = 128
H = 64  # hidden size; every linear dimension below divides by 16 and by 4


def _configs():
    common = dict(vocab_size=VOCAB)
    base = dict(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, **common)  # fmt: skip
    gqa = dict(base, num_key_value_heads=2)
    return {
        "llama": LlamaConfig(**gqa),
        "opt": OPTConfig(
            hidden_size=H,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=H,
            max_position_embeddings=256,
            **common,
        ),  # fmt: skip
        "gpt2": GPT2Config(n_embd=H, n_layer=2, n_head=4, n_positions=256, **common),
        "gpt_neox": GPTNeoXConfig(**base),
        "bloom": BloomConfig(hidden_size=H, n_layer=2, n_head=4, **common),
        "falcon": FalconConfig(
            hidden_size=H,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            alibi=False,
            **common,
        ),  # fmt: skip
        "mistral": MistralConfig(**gqa, sliding_window=32),
        "mixtral": MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2),
        "qwen2": Qwen2Config(**gqa),
        "phi": PhiConfig(**base),
        "gemma": GemmaConfig(**gqa, head_dim=16),
    }


FAMILIES = list(_configs())


def tiny_model(family: str, seed: int = 0):
    """A tiny random ``*ForCausalLM`` of ``family`` in eval mode (fp32, CPU)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[family])
    return model.eval()


def pruned_tiny(family: str = "llama", **config):
    """A tiny model of ``family`` pruned with Wanda (hybrid by default) on random calibration tokens."""
    from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity

    model = tiny_model(family)
    apply_hybrid_sparsity(model, HybridSparseConfig(nsamples=4, seqlen=32, **config), random_tokens(4, 32))
    return model


def random_tokens(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[n, seqlen]`` random token ids for calibration of the tiny models."""
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
