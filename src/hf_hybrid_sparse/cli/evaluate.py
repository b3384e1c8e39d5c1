"""``hf-hybrid-sparse eval``: perplexity and task metrics, a pruned model beside its dense original."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .arguments import ModelArguments, preflight, say


@dataclass
class EvalCommandArguments:
    """Evaluate a (pruned) model, optionally side by side with its dense original."""

    dense_model: str | None = field(default=None, metadata={"help": "Dense model to compare against."})
    perplexity: str = field(
        default="wiki_offline", metadata={"help": "Comma-separated: wikitext2, c4, wiki_offline."}
    )
    seqlen: int = field(
        default=512,
        metadata={"help": "Tokens per perplexity window (the papers use 2048; 512 = prune's default)."},
    )
    max_windows: int = field(
        default=32,
        metadata={
            "help": "Max windows per corpus (0: all). 32 x 512 matches `prune`, so both print the same number."
        },
    )
    tasks: str | None = field(
        default=None, metadata={"help": "lm-eval tasks ('default' = the Wanda paper's seven)."}
    )
    squad: bool = field(default=False, metadata={"help": "SQuAD v2 EM/F1."})
    gsm8k: bool = field(default=False, metadata={"help": "GSM8K accuracy."})
    limit: int | None = field(default=None, metadata={"help": "Max examples per task."})
    batch_size: int = field(default=4, metadata={"help": "Batch size of every evaluation."})
    json_out: str | None = field(default=None, metadata={"help": "Write the results as JSON here."})


def _evaluate(model, tokenizer, args: EvalCommandArguments) -> dict[str, float]:
    from ..evaluation import DEFAULT_LM_EVAL_TASKS, evaluate_gsm8k, evaluate_squad, perplexity, zero_shot

    out: dict[str, float] = {}
    for name in [n.strip() for n in args.perplexity.split(",") if n.strip()]:
        res = perplexity(
            model,
            tokenizer,
            name,
            seqlen=args.seqlen,
            max_windows=args.max_windows or None,
            batch_size=args.batch_size,
        )
        out[f"ppl {name}"] = res.perplexity
        out[f"ppl {name} tokens"] = res.tokens
        say(f"perplexity {res.perplexity:.3f} ({res.protocol()})")
    if args.tasks:
        tasks = DEFAULT_LM_EVAL_TASKS if args.tasks == "default" else args.tasks.split(",")
        for task, acc in zero_shot(
            model, tokenizer, tasks, batch_size=args.batch_size, limit=args.limit
        ).items():
            out[f"{task} acc"] = acc
    if args.squad:
        res = evaluate_squad(model, tokenizer, max_samples=args.limit, batch_size=args.batch_size)
        out["squad EM"], out["squad F1"] = res["exact_match"], res["f1"]
    if args.gsm8k:
        out["gsm8k acc"] = evaluate_gsm8k(
            model, tokenizer, max_samples=args.limit, batch_size=args.batch_size
        )["accuracy"]
    return out


def run(argv: list[str]) -> int:
    """Parse ``argv``, evaluate, print a markdown table (dense vs pruned) and write JSON."""
    parser = HfArgumentParser((ModelArguments, EvalCommandArguments))
    parser.prog = "hf-hybrid-sparse eval"
    model_args, args = parser.parse_args_into_dataclasses(args=argv)
    for name in [n.strip() for n in args.perplexity.split(",") if n.strip()]:
        preflight(model_args.model, (args.seqlen,), calib=name)
    from ..models import load_model_and_tokenizer

    columns = {}
    if args.dense_model:
        dense, tok = load_model_and_tokenizer(args.dense_model, model_args.dtype, model_args.device_map)
        columns["dense"] = _evaluate(dense, tok, args)
        del dense
    model, tok = load_model_and_tokenizer(model_args.model, model_args.dtype, model_args.device_map)
    columns[model_args.model] = _evaluate(model, tok, args)
    names = list(columns)
    say("| metric | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for metric in columns[names[-1]]:
        cells = [columns[n].get(metric) for n in names]
        say(
            f"| {metric} | "
            + " | ".join("" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells)
            + " |"
        )
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(columns, fh, indent=2)
    return 0
