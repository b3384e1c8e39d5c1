import json

import pytest
import torch

from hf_hybrid_sparse import CalibrationError
from hf_hybrid_sparse.data.calibration import (
    get_calibration_samples,
    load_offline_corpus,
    resolve_texts_or_tokens,
)


def test_offline_corpus_splits_are_disjoint_and_real():
    train, test = load_offline_corpus("train"), load_offline_corpus("test")
    assert len(train) > 8000 and len(test) > 900
    assert not set(train) & set(test)
    assert all(isinstance(t, str) and t for t in test[:50])


def test_named_offline_calibration_is_seeded(smollm2):
    _, tok = smollm2
    a = get_calibration_samples("wiki_offline", tok, 4, 64, seed=1)
    b = get_calibration_samples("wiki_offline", tok, 4, 64, seed=1)
    c = get_calibration_samples("offline", tok, 4, 64, seed=2)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    text = tok.decode(a[0])
    assert len(text.split()) > 20  # real English text, not padding


def test_text_list_txt_jsonl_and_dataset_agree(tmp_path, smollm2):
    from datasets import Dataset

    _, tok = smollm2
    texts = [f"Paragraph {i} talks about the history of the number {i} in detail." for i in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(texts))
    with open(tmp_path / "c.jsonl", "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    ref = get_calibration_samples(texts, tok, 3, 32, seed=0)
    assert torch.equal(ref, get_calibration_samples(str(tmp_path / "c.txt"), tok, 3, 32, seed=0))
    assert torch.equal(ref, get_calibration_samples(tmp_path / "c.jsonl", tok, 3, 32, seed=0))
    assert torch.equal(ref, get_calibration_samples(Dataset.from_dict({"text": texts}), tok, 3, 32, seed=0))


def test_token_inputs():
    from datasets import Dataset

    ids = [list(range(i, i + 40)) for i in range(5)]
    out = get_calibration_samples(Dataset.from_dict({"input_ids": ids}), None, 4, 32)
    assert out.tolist() == [row[:32] for row in ids[:4]]
    assert torch.equal(get_calibration_samples(torch.tensor(ids), None, 2, 8), torch.tensor(ids)[:2, :8])
    assert torch.equal(
        get_calibration_samples([torch.tensor(r) for r in ids], None, 5, 40), torch.tensor(ids)
    )


def test_bad_data_errors(tmp_path, smollm2):
    from datasets import Dataset

    _, tok = smollm2
    with pytest.raises(CalibrationError, match=r"columns are \['question', 'answer'\]"):
        resolve_texts_or_tokens(Dataset.from_dict({"question": ["a"], "answer": ["b"]}))
    with pytest.raises(CalibrationError, match=r"only \d+ tokens; at least seqlen\+1=513"):
        get_calibration_samples(["A short text."], tok, 1, 512)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2 is not valid JSON"):
        get_calibration_samples(tmp_path / "bad.jsonl", tok, 1, 4)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CalibrationError, match="unsupported file type"):
        get_calibration_samples(tmp_path / "x.csv", tok, 1, 4)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        get_calibration_samples(["some text " * 50], None, 1, 8)
    with pytest.raises(CalibrationError, match="Cannot use int"):
        get_calibration_samples(3, tok, 1, 8)
