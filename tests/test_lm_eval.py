"""lm-eval end to end on a tiny local task against the embedded model, checked against a direct computation."""

import json
import textwrap

import pytest
import torch

pytest.importorskip(
    "lm_eval", reason="lm-eval is the [eval] extra; .ci/run installs it, so CI runs this test"
)

from hf_hybrid_sparse.evaluation.zero_shot import zero_shot  # noqa: E402

ITEMS = [
    ("The capital of France is", [" Paris", " a banana"], 0),
    ("Water freezes at zero degrees", [" Fahrenheit", " Celsius"], 1),
    ("The opposite of hot is", [" cold", " Tuesday"], 0),
    ("Two plus two equals", [" seven", " four"], 1),
    ("The sun rises in the", [" east", " spoon"], 0),
    ("A group of wolves is called a", [" sandwich", " pack"], 1),
]


def _direct_accuracy(model, tok):
    correct = 0
    with torch.no_grad():
        for context, choices, label in ITEMS:
            scores = []
            for choice in choices:
                ctx = tok(context, add_special_tokens=False)["input_ids"]
                cont = tok(context + choice, add_special_tokens=False)["input_ids"][len(ctx) :]
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
            correct += int(max(range(len(choices)), key=lambda i: scores[i]) == label)
    return 100.0 * correct / len(ITEMS)


def test_lm_eval_local_task_matches_direct_loglikelihood(smollm2, tmp_path):
    model, tok = smollm2
    data = tmp_path / "tiny.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": q, "choices": c, "label": lab}) for q, c, lab in ITEMS) + "\n"
    )
    (tmp_path / "tiny_local_mc.yaml").write_text(
        textwrap.dedent(f"""
        task: tiny_local_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)
    )
    res = zero_shot(model, tok, tasks=["tiny_local_mc"], batch_size=2, include_path=str(tmp_path))
    assert set(res) == {"tiny_local_mc"}
    assert res["tiny_local_mc"] == pytest.approx(_direct_accuracy(model, tok))
