"""The embedded SmolLM2-135M: real weights, real text, real perplexity."""

import copy
import math

import torch

from hf_hybrid_sparse import HybridSparseConfig, apply_hybrid_sparsity, perplexity
from hf_hybrid_sparse.data.calibration import get_calibration_samples
from hf_hybrid_sparse.pruning.matrix import prune_matrix
from hf_hybrid_sparse.pruning.scoring import InputStats

CALIB = dict(nsamples=16, seqlen=256, batch_size=8)


def _ppl(model, tok):
    return perplexity(model, tok, "wiki_offline", seqlen=256, max_windows=8, batch_size=4).perplexity


def test_perplexity_matches_token_by_token_computation(smollm2):
    model, tok = smollm2
    ids = get_calibration_samples("wiki_offline", tok, 2, 24, seed=3)
    res = perplexity(model, tok, ids, seqlen=24, batch_size=2)
    assert res.tokens == 2 * 23 and res.windows == 2
    nll = 0.0
    with torch.no_grad():
        for window in ids:
            for t in range(1, 24):
                logits = model(input_ids=window[:t].unsqueeze(0), use_cache=False).logits[0, -1]
                nll -= torch.log_softmax(logits.double(), -1)[window[t]].item()
    assert math.isclose(res.perplexity, math.exp(nll / 46), rel_tol=1e-4)


def test_dense_beats_wanda_beats_magnitude(smollm2):
    model, tok = smollm2
    dense = _ppl(model, tok)
    results = {}
    for method in ("wanda", "magnitude"):
        pruned = copy.deepcopy(model)
        cfg = HybridSparseConfig(method=method, pattern="unstructured", sparsity=0.5, **CALIB)
        report = apply_hybrid_sparsity(pruned, cfg, "wiki_offline", tokenizer=tok)
        assert abs(report.sparsity - 0.5) < 1e-9
        results[method] = _ppl(pruned, tok)
    assert dense < results["wanda"] < results["magnitude"], (dense, results)
    assert dense < 40  # a real model on real text


def _capture(model, tok, module, n=8, seqlen=256):
    seen = []
    h = module.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=get_calibration_samples("wiki_offline", tok, n, seqlen, seed=7), use_cache=False)
    h.remove()
    return torch.cat(seen)


def test_sparsegpt_reconstructs_better_than_wanda_on_real_activations(smollm2):
    model, tok = smollm2
    layers = [model.model.layers[3].mlp.down_proj, model.model.layers[10].self_attn.q_proj]
    for layer in layers:
        x = _capture(model, tok, layer)
        stats = InputStats(x.shape[1], x.device, hessian=True)
        stats.add(x)
        w = layer.weight.detach()
        ref = x @ w.t()
        for pattern in ("unstructured", "2:4", "hybrid"):
            errs = {}
            for method in ("wanda", "sparsegpt"):
                cfg = HybridSparseConfig(method=method, pattern=pattern, sparsity=0.5)
                res = prune_matrix(w, cfg, stats)
                assert (res.weight[~res.mask] == 0).all()
                errs[method] = (x @ res.weight.t() - ref).pow(2).sum().item()
            assert errs["sparsegpt"] < 0.9 * errs["wanda"], (pattern, errs)


def test_embedded_model_round_trip_keeps_state_and_perplexity(smollm2_copy, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_hybrid_sparse import sparsity_masks, tier_maps

    model, tok = smollm2_copy
    apply_hybrid_sparsity(model, HybridSparseConfig(method="magnitude", pattern="hybrid"))
    model.save_pretrained(tmp_path / "m", max_shard_size="200MB")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) >= 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    a, b = sparsity_masks(model), sparsity_masks(loaded)
    assert len(a) == 30 * 7 and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, tier_maps(loaded)[k]) for k, v in tier_maps(model).items())
    ids = get_calibration_samples("wiki_offline", tok, 2, 128, seed=11)
    p1 = perplexity(model, tok, ids, seqlen=128).perplexity
    p2 = perplexity(loaded, tok, ids, seqlen=128).perplexity
    assert p1 == p2
