"""Named sets through their real loader code, fed by local files in the upstream formats."""

import gzip
import json

import pytest
import torch
from datasets import Dataset

from hf_hybrid_sparse import CalibrationError, perplexity
from hf_hybrid_sparse.data.calibration import get_calibration_samples
from hf_hybrid_sparse.data.corpora import (
    calibration_windows,
    eval_tokens,
    mixture_counts,
    named,
    parse_mixture,
)

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
]


def _para(i, n=60):
    g = torch.Generator().manual_seed(i)
    return f"Doc{i} " + " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    files = {}
    # wikitext-2-raw-v1: parquet, one "text" column, lines incl. blank ones and headings
    wt = root / "wikitext-2-raw-v1"
    wt.mkdir()
    for split, n in (("train", 200), ("test", 40)):
        rows = []
        for i in range(n):
            rows += ["", f" = Heading {i} = ", "", " " + _para(i + (0 if split == "train" else 10_000))]
        Dataset.from_dict({"text": rows}).to_parquet(wt / f"{split}-00000-of-00001.parquet")
    files["wikitext2"] = {s: str(wt / f"{s}-00000-of-00001.parquet") for s in ("train", "test")}
    # allenai/c4 en: gzipped json lines with text, timestamp, url
    c4 = root / "en"
    c4.mkdir()
    for split, name, n in (
        ("train", "c4-train.00000-of-01024.json.gz", 60),
        ("validation", "c4-validation.00000-of-00008.json.gz", 1200),
    ):
        with gzip.open(c4 / name, "wt") as fh:
            for i in range(n):
                length = 8 if i % 2 else 120  # every other document is too short for seqlen=64
                text = ("SHORTDOC " if i % 2 else "") + _para(
                    i + (50_000 if split == "validation" else 0), length
                )
                fh.write(
                    json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"})
                    + "\n"
                )
    files["c4"] = {
        "train": str(c4 / "c4-train.00000-of-01024.json.gz"),
        "validation": str(c4 / "c4-validation.00000-of-00008.json.gz"),
    }
    # squad_v2 and gsm8k: json lines with the upstream columns
    with open(root / "squad_train.jsonl", "w") as fh:
        for i in range(300):
            answers = (
                {"text": [f"answer{i}"], "answer_start": [3]} if i % 3 else {"text": [], "answer_start": []}
            )
            fh.write(
                json.dumps(
                    {
                        "id": str(i),
                        "title": "T",
                        "context": _para(i, 20),
                        "question": f"What is {i}?",
                        "answers": answers,
                    }
                )
                + "\n"
            )
    files["squad"] = {"train": str(root / "squad_train.jsonl")}
    with open(root / "gsm8k_train.jsonl", "w") as fh:
        for i in range(300):
            fh.write(
                json.dumps(
                    {
                        "question": f"Tom has {i} apples and buys 2. How many?",
                        "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}",
                    }
                )
                + "\n"
            )
    files["gsm8k"] = {"train": str(root / "gsm8k_train.jsonl")}
    return files


@pytest.mark.parametrize("name", ["wikitext2", "c4", "squad", "gsm8k"])
def test_named_sets_are_seeded_and_reproducible(smollm2, upstream, name):
    _, tok = smollm2
    spec = named(name, data_files=upstream[name])
    a = get_calibration_samples(spec, tok, 6, 64, seed=0)
    b = get_calibration_samples(spec, tok, 6, 64, seed=0)
    c = get_calibration_samples(spec, tok, 6, 64, seed=1)
    assert a.shape == (6, 64) and torch.equal(a, b) and not torch.equal(a, c)
    text = tok.decode(a.reshape(-1))
    marker = {"wikitext2": " the ", "c4": " the ", "squad": "Context:", "gsm8k": "Question:"}[name]
    assert marker in text


def test_c4_uses_only_documents_longer_than_seqlen(smollm2, upstream):
    _, tok = smollm2
    windows = calibration_windows(named("c4", data_files=upstream["c4"]), tok, 16, 64, seed=3)
    assert "SHORTDOC" not in tok.decode(windows.reshape(-1))


def test_task_examples_are_packed_with_eos_and_no_padding(smollm2, upstream):
    _, tok = smollm2
    w = calibration_windows(named("gsm8k", data_files=upstream["gsm8k"]), tok, 4, 128, seed=0)
    flat = w.reshape(-1)
    assert int((flat == tok.eos_token_id).sum()) >= 8  # examples are short: many boundaries
    text = tok.decode(flat)
    assert "####" in text and "Answer:" in text
    squad = tok.decode(
        calibration_windows(named("squad", data_files=upstream["squad"]), tok, 4, 128, seed=0).reshape(-1)
    )
    assert "unanswerable" in squad and "Question: What is" in squad


def test_mixture_honours_weights(smollm2, upstream):
    _, tok = smollm2
    mix = [
        (named("wikitext2", data_files=upstream["wikitext2"]), 0.25),
        (named("gsm8k", data_files=upstream["gsm8k"]), 0.75),
    ]
    out = get_calibration_samples(mix, tok, 8, 64, seed=0)
    assert out.shape == (8, 64)
    decoded = [tok.decode(row) for row in out]
    assert sum("Question:" in d or "####" in d for d in decoded) == 6
    assert mixture_counts([0.5, 0.5], 7) == [4, 3] and sum(mixture_counts([0.2, 0.3, 0.5], 13)) == 13
    assert parse_mixture("wikitext2:0.5,gsm8k:0.5") == [("wikitext2", 0.5), ("gsm8k", 0.5)]
    with pytest.raises(CalibrationError, match="sum to 0.9"):
        parse_mixture("wikitext2:0.5,gsm8k:0.4")
    with pytest.raises(CalibrationError, match="sum to 1.2"):
        get_calibration_samples([(mix[0][0], 0.6), (mix[1][0], 0.6)], tok, 4, 64)
    with pytest.raises(CalibrationError, match="not NAME:WEIGHT"):
        parse_mixture("wikitext2:0.5,gsm8k")


def test_wikitext2_perplexity_protocol(smollm2, upstream):
    model, tok = smollm2
    spec = named("wikitext2", data_files=upstream["wikitext2"])
    ids = eval_tokens(spec, tok, 64)
    test_rows = Dataset.from_parquet(upstream["wikitext2"]["test"])["text"]
    manual = tok("\n\n".join(test_rows), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == manual
    res = perplexity(model, tok, spec, seqlen=64, max_windows=3)
    direct = perplexity(model, tok, [torch.tensor(manual)], seqlen=64, max_windows=3)
    assert res.perplexity == direct.perplexity and res.tokens == 3 * 63


def test_c4_validation_protocol_first_1100_documents(smollm2, upstream):
    _, tok = smollm2
    ids = eval_tokens(named("c4", data_files=upstream["c4"]), tok, 8)
    assert ids.numel() == 256 * 8  # capped at 256 x seqlen tokens
    big = eval_tokens(named("c4", data_files=upstream["c4"]), tok, 4096)
    text = tok.decode(big)
    assert "Doc51099" in text and "Doc51100" not in text  # document 1099 is in, 1100 is not


def test_bad_named_inputs(smollm2, upstream, tmp_path):
    _, tok = smollm2
    with pytest.raises(CalibrationError, match="named sets are c4, gsm8k, squad, wikitext2"):
        named("wikitext103")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(
        CalibrationError, match=r"no column\(s\) \['answer'\]; its columns are \['question', 'solution'\]"
    ):
        get_calibration_samples(named("gsm8k", data_files={"train": str(tmp_path / "bad.jsonl")}), tok, 1, 8)
    with pytest.raises(CalibrationError, match=r"pack into \d+ tokens, 6400000 are needed"):
        get_calibration_samples(named("gsm8k", data_files=upstream["gsm8k"]), tok, 100, 64000)

    class NoEos:
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2, 3]}

    with pytest.raises(CalibrationError, match="EOS token"):
        calibration_windows(named("gsm8k", data_files=upstream["gsm8k"]), NoEos(), 1, 4, 0)
    with pytest.raises(CalibrationError, match="task set"):
        eval_tokens(named("squad", data_files=upstream["squad"]), tok, 8)
