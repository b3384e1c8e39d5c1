"""Zero-shot accuracy through lm-eval (extra ``[eval]``), the Wanda paper's task list by default."""

from __future__ import annotations

#: the zero-shot tasks of the Wanda paper
DEFAULT_LM_EVAL_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def zero_shot(
    model,
    tokenizer,
    tasks: list[str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    include_path: str | None = None,
    num_fewshot: int = 0,
) -> dict[str, float]:
    """Accuracy (percent, ``acc``; ``acc_norm`` too where the task has it) per task through lm-eval.

    Needs the extra ``[eval]``; ``include_path`` adds a folder of local task YAMLs.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(
            "Zero-shot evaluation needs lm-eval: pip install 'hf-hybrid-sparse[eval]'"
        ) from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks or DEFAULT_LM_EVAL_TASKS,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_path=include_path),
        log_samples=False,
    )
    out = {}
    for task, metrics in results["results"].items():
        if metrics.get("acc,none") is not None:
            out[task] = 100.0 * float(metrics["acc,none"])
        if metrics.get("acc_norm,none") is not None:
            out[f"{task} (acc_norm)"] = 100.0 * float(metrics["acc_norm,none"])
    return out
