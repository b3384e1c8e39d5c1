import json

import pytest
import torch

from hf_hybrid_sparse import CalibrationError
from hf_hybrid_sparse.data.calibration import (
    CalibrationSet,
    get_calibration_samples,
    load_offline_corpus,
    resolve_texts_or_tokens,
    sample_documents,
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
    (tmp_path / "x.bin").write_text("a,b")
    with pytest.raises(CalibrationError, match="unsupported file type"):
        get_calibration_samples(tmp_path / "x.bin", tok, 1, 4)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        get_calibration_samples(["some text " * 50], None, 1, 8)
    with pytest.raises(CalibrationError, match="Cannot use int"):
        get_calibration_samples(3, tok, 1, 8)


TEXTS = [f"Paragraph {i} talks about the history of the number {i} in detail." for i in range(40)]
CHATS = [
    [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}."},
    ]
    for i in range(40)
]


def test_every_upstream_input_kind_gives_the_same_windows(tmp_path, smollm2, monkeypatch):
    """Hub id, DatasetDict + split, any text column, save_to_disk folder and .json/.parquet/.csv files."""
    import datasets
    from datasets import Dataset, DatasetDict

    _, tok = smollm2
    ref = get_calibration_samples(TEXTS, tok, 3, 32, seed=0)
    body = Dataset.from_dict({"content": TEXTS, "id": list(range(len(TEXTS)))})
    assert torch.equal(ref, get_calibration_samples(CalibrationSet(body, text_column="content"), tok, 3, 32))
    dd = DatasetDict({"train_sft": body, "test_sft": body.select(range(2))})
    got = get_calibration_samples(CalibrationSet(dd, split="train_sft", text_column="content"), tok, 3, 32)
    assert torch.equal(ref, got)
    with pytest.raises(CalibrationError, match=r"splits \['test_sft', 'train_sft'\], not 'train'"):
        get_calibration_samples(CalibrationSet(dd, text_column="content"), tok, 3, 32)
    with pytest.raises(CalibrationError, match="no 'text' or 'input_ids' column.*text_column=NAME"):
        get_calibration_samples(body, tok, 3, 32)

    dd.save_to_disk(str(tmp_path / "saved"))
    folder = CalibrationSet(str(tmp_path / "saved"), split="train_sft", text_column="content")
    assert torch.equal(ref, get_calibration_samples(folder, tok, 3, 32))
    body.to_parquet(str(tmp_path / "c.parquet"))
    body.to_csv(str(tmp_path / "c.csv"))
    body.to_json(str(tmp_path / "c.json"))
    for name in ("c.parquet", "c.csv", "c.json"):
        spec = CalibrationSet(tmp_path / name, text_column="content")
        assert torch.equal(ref, get_calibration_samples(spec, tok, 3, 32)), name

    calls = []

    def fake_load_dataset(path, *args, split=None, **kwargs):
        calls.append((path, split))
        return body

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = CalibrationSet("HuggingFaceH4/ultrachat_200k", split="train_sft", text_column="content")
    assert torch.equal(ref, get_calibration_samples(hub, tok, 3, 32))
    assert calls == [("HuggingFaceH4/ultrachat_200k", "train_sft")]


def test_hub_id_offline_fails_in_one_line(smollm2, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalibrationError) as err:
        get_calibration_samples("org/data", smollm2[1], 1, 8)
    assert "Could not load the Hub dataset 'org/data' (split 'train'): Couldn't reach" in str(err.value)
    assert "\n" not in str(err.value) and "save_to_disk" in str(err.value)


def test_chat_messages_render_with_the_template(tmp_path, smollm2):
    from datasets import Dataset

    _, tok = smollm2
    assert tok.chat_template
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in CHATS]
    assert "<|im_start|>assistant" in rendered[0]
    ref = get_calibration_samples(CalibrationSet(rendered, add_special_tokens=False), tok, 2, 48, seed=3)
    ds = Dataset.from_dict({"messages": CHATS})
    got = get_calibration_samples(CalibrationSet(ds, chat_template=True), tok, 2, 48, seed=3)
    assert torch.equal(ref, got)
    with open(tmp_path / "chat.jsonl", "w") as fh:
        for m in CHATS:
            fh.write(json.dumps({"messages": m}) + "\n")
    got = get_calibration_samples(
        CalibrationSet(tmp_path / "chat.jsonl", chat_template=True), tok, 2, 48, seed=3
    )
    assert torch.equal(ref, got)
    with pytest.raises(CalibrationError, match="holds chat messages, not text; pass chat_template=True"):
        get_calibration_samples(CalibrationSet(ds, text_column="messages"), tok, 2, 48)
    with pytest.raises(CalibrationError, match="or chat_template=True"):
        get_calibration_samples(ds, tok, 2, 48)
    with pytest.raises(CalibrationError, match="record 1 has no 'text' field"):
        get_calibration_samples(tmp_path / "chat.jsonl", tok, 2, 48)


def test_windows_come_from_the_whole_corpus():
    docs = [f"doc{i:04d} " + "x" * 50 for i in range(2000)]
    budget = 5000
    picks = [sample_documents(docs, budget, seed) for seed in range(5)]
    for picked in picks:
        assert sum(len(t) + 2 for t in picked) <= budget + 2
        whole = [t for t in picked if t in docs]
        assert len(whole) >= len(picked) - 1  # at most one document cut to the room left
        assert whole == sorted(whole)  # corpus order kept
    assert picks[0] == sample_documents(docs, budget, 0)  # seeded
    assert picks[0] != picks[1]
    ids = sorted(int(t[3:7]) for p in picks for t in p if t in docs)
    assert ids[0] < 200 and ids[-1] > 1800  # not just the head
    assert sample_documents(docs[:10], budget, 0) == docs[:10]  # small corpora are used whole
    long = "abcdefghij" * 1000
    cut = sample_documents([long], 300, 1)
    assert len(cut) == 1 and len(cut[0]) == 300 and cut[0] in long and cut != sample_documents([long], 300, 2)


class _BosTokenizer:
    """A character tokenizer that prepends BOS=1 like Llama's (ids 2.. for characters)."""

    bos_token_id, eos_token_id = 1, 0

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        ids = [2 + (ord(c) % 100) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_bos_is_kept_like_the_reference_loaders_with_a_switch():
    tok = _BosTokenizer()
    text = ["a" * 16]  # 16 characters: one window of 16 plus the BOS, so the window starts at 0
    with_bos = get_calibration_samples(text, tok, 1, 16)
    without = get_calibration_samples(CalibrationSet(text, add_special_tokens=False), tok, 1, 15)
    assert with_bos[0, 0].item() == 1 and (with_bos[0, 1:] == 2 + ord("a") % 100).all()
    assert (without == 2 + ord("a") % 100).all()
    # a mixture's components are read with the mixture's options
    mixture = CalibrationSet([(text, 0.5), (["b" * 16], 0.5)], add_special_tokens=False)
    mixed = get_calibration_samples(mixture, tok, 2, 15)
    assert 1 not in mixed.tolist()[0] + mixed.tolist()[1]
    assert (mixed[1] == 2 + ord("b") % 100).all()
    assert get_calibration_samples([(text, 0.5), (["b" * 16], 0.5)], tok, 2, 16)[:, 0].tolist() == [1, 1]
