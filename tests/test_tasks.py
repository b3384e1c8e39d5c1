"""Task scoring on known answer pairs, and the generation-based evaluations end to end on the real model."""

import json

import pytest

from hf_hybrid_sparse.data.corpora import named
from hf_hybrid_sparse.errors import CalibrationError
from hf_hybrid_sparse.evaluation.tasks import (
    evaluate_gsm8k,
    evaluate_squad,
    gsm8k_correct,
    gsm8k_reference,
    last_number,
    normalize_answer,
    squad_f1,
    squad_scores,
)


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an Apple, a day") == "apple day"
    assert squad_scores("the Eiffel Tower", ["Eiffel Tower", "Paris"]) == (1.0, 1.0)
    em, f1 = squad_scores("Eiffel Tower in Paris", ["Eiffel Tower"])
    assert em == 0.0 and f1 == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    # unanswerable: the gold is the empty answer
    assert squad_scores("", []) == (1.0, 1.0)
    assert squad_scores("unanswerable", []) == (1.0, 1.0)
    assert squad_scores("Paris", []) == (0.0, 0.0)
    assert squad_scores("", ["Paris"]) == (0.0, 0.0)
    assert squad_f1("a the an", "the") == 1.0  # both normalise to empty


def test_gsm8k_number_extraction():
    assert last_number("so she has 1,234.5 apples.") == 1234.5
    assert last_number("no digits") is None
    assert last_number("-3 degrees") == -3
    assert gsm8k_reference("4 + 4 = 8\n#### 8") == 8
    assert gsm8k_correct("He buys 3 more, so 5 + 3 = 8. The answer is 8.", "#### 8")
    assert not gsm8k_correct("The answer is 9", "#### 8")
    assert gsm8k_correct(
        "Total: 1,000\nQuestion: next one 7", "#### 1000"
    )  # a made-up next question is ignored
    with pytest.raises(CalibrationError, match="no '####'"):
        gsm8k_reference("8")


@pytest.fixture
def task_files(tmp_path):
    squad = tmp_path / "squad_validation.jsonl"
    rows = [
        {
            "id": "1",
            "title": "Paris",
            "context": "Paris is the capital of France.",
            "question": "What is the capital of France?",
            "answers": {"text": ["Paris"], "answer_start": [0]},
        },
        {
            "id": "2",
            "title": "Moon",
            "context": "The Moon orbits the Earth.",
            "question": "Who wrote Hamlet?",
            "answers": {"text": [], "answer_start": []},
        },
    ]
    squad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    gsm = tmp_path / "gsm8k_test.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    return {"squad": {"validation": str(squad)}, "gsm8k": {"test": str(gsm)}}


def test_squad_and_gsm8k_evaluations_run_on_the_embedded_model(smollm2, task_files):
    model, tok = smollm2
    res = evaluate_squad(model, tok, named("squad", data_files=task_files["squad"]), batch_size=2)
    assert res["n"] == 2 and 0 <= res["exact_match"] <= 100 and 0 <= res["f1"] <= 100
    assert res["exact_match"] <= res["f1"]
    res = evaluate_gsm8k(model, tok, named("gsm8k", data_files=task_files["gsm8k"]), max_new_tokens=24)
    assert res["n"] == 1 and res["accuracy"] in (0.0, 100.0)
