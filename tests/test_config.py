import json

import pytest
from transformers import AutoConfig
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AutoQuantizationConfig

from hf_hybrid_sparse import ConfigError, HybridSparseConfig
from hf_hybrid_sparse.config import parse_nm


def test_defaults_match_design():
    cfg = HybridSparseConfig()
    assert cfg.quant_method == "hybrid_sparse"
    assert cfg.tier_ratios == (0.35, 0.45, 0.20)
    assert cfg.block_size == 16 and cfg.topk_per_block == 15 and cfg.nm == "2:4"
    assert cfg.ignore == ["lm_head"]


def test_round_trip_dict_and_json():
    cfg = HybridSparseConfig(
        method="sparsegpt",
        pattern="hybrid",
        tier_ratios=(0.5, 0.3, 0.2),
        tier_group="row",
        targets=["q_proj"],
    )
    again = HybridSparseConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.tier_ratios, tuple)


def test_registered_as_quantization_config():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hybrid_sparse"] is HybridSparseConfig
    cfg = AutoQuantizationConfig.from_dict(HybridSparseConfig(pattern="2:4").to_dict())
    assert isinstance(cfg, HybridSparseConfig) and cfg.pattern == "2:4"


def test_travels_in_model_config(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.quantization_config = HybridSparseConfig(method="magnitude")
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "hybrid_sparse" and stored["method"] == "magnitude"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert HybridSparseConfig.from_dict(loaded.quantization_config) == config.quantization_config


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tier_ratios": (0.5, 0.5, 0.5)}, "sum to"),
        ({"tier_ratios": (1.2, -0.2, 0.0)}, "negative"),
        ({"tier_ratios": (0.5, 0.5)}, "3 values"),
        ({"sparsity": 1.0}, "outside [0, 1)"),
        ({"sparsity": -0.1}, "outside [0, 1)"),
        ({"pattern": "4:2"}, "N=4 > M=2"),
        ({"pattern": "two:four"}, "not of the form"),
        ({"nm": "3:2"}, "N=3 > M=2"),
        ({"topk_per_block": 257}, "does not fit"),
        ({"block_size": 10}, "not a multiple of M=4"),
        ({"method": "obs"}, "unknown"),
        ({"tier_group": "column"}, "choose 'row' or 'layer'"),
        ({"nsamples": 0}, "positive"),
        ({"targets": "(unclosed"}, "regular expression"),
        ({"method": "sparsegpt", "sparsegpt_blocksize": 100}, "multiple of 16"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(kwargs, words):
    with pytest.raises(ConfigError, match=__import__("re").escape(words)):
        HybridSparseConfig(**kwargs)


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm(" 4 : 8 ") == (4, 8)
    with pytest.raises(ConfigError):
        parse_nm("0:4")


def test_unknown_field_rejected():
    with pytest.raises(ConfigError, match="Unknown HybridSparseConfig field"):
        HybridSparseConfig.from_dict({"sparsity": 0.5, "bogus": 1})


def test_nm_conventions_are_explicit_where_they_differ():
    """NVIDIA counts N kept, SparseGPT/Wanda count N pruned: 2:4 and 4:8 mean the same, 3:4 does not."""
    assert HybridSparseConfig(pattern="2:4").pattern_nm == (2, 4)
    assert HybridSparseConfig(pattern="4:8", nm_convention="prune").pattern_nm == (4, 8)
    with pytest.raises(ConfigError, match=r"ambiguous.*keep 3 of every 4.*prune 3 of every 4.*nm_convention"):
        HybridSparseConfig(pattern="3:4")
    with pytest.raises(ConfigError, match=r"nm='1:4' is ambiguous"):
        HybridSparseConfig(nm="1:4")
    keep = HybridSparseConfig(pattern="3:4", nm_convention="keep")
    prune = HybridSparseConfig(pattern="1:4", nm_convention="prune")
    assert keep.pattern_nm == prune.pattern_nm == (3, 4)
    # stored in the kept form, so the saved recipe reads back the same
    assert prune.pattern == "3:4" and prune.nm_convention == "keep"
    assert HybridSparseConfig.from_dict(prune.to_dict()) == prune
    assert HybridSparseConfig(nm="6:8", nm_convention="prune").nm_tuple == (2, 8)
    with pytest.raises(ConfigError, match="needs 0 <= N < M"):
        HybridSparseConfig(pattern="4:4", nm_convention="prune")
    with pytest.raises(ConfigError, match="choose 'keep' or 'prune'"):
        HybridSparseConfig(nm_convention="kept")
