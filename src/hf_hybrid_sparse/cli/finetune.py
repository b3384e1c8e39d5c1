"""``hf-hybrid-sparse finetune``: recovery fine-tuning of a pruned model (full, or LoRA), keeping its sparsity."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from ..errors import HybridSparseError
from .arguments import DistillationArguments, ModelArguments, preflight, say


@dataclass
class FinetuneArguments:
    """Recovery fine-tuning of a pruned model (full, or LoRA with lora_r > 0)."""

    data: str = field(
        default="wiki_offline", metadata={"help": "Training text: a name or a .txt/.jsonl path."}
    )
    seqlen: int = field(default=512, metadata={"help": "Tokens per training window (and perplexity window)."})
    max_samples: int | None = field(default=None, metadata={"help": "Max training windows."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_targets: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names that get LoRA adapters."},
    )
    lora_mode: str = field(
        default="masked",
        metadata={
            "help": "masked (exact sparse merge) or remask (vanilla LoRA, masks re-applied after merging)."
        },
    )
    eval_windows: int | None = field(default=16, metadata={"help": "Perplexity windows before/after."})
    final_dir: str | None = field(
        default=None, metadata={"help": "Where to save the final (merged) model (default OUTPUT_DIR/final)."}
    )


def run(argv: list[str]) -> int:
    """Parse ``argv``, fine-tune with :class:`SparseTrainer`, print perplexity before/after, save."""
    parser = HfArgumentParser((ModelArguments, FinetuneArguments, DistillationArguments, TrainingArguments))
    parser.prog = "hf-hybrid-sparse finetune"
    model_args, ft, distill_args, targs = parser.parse_args_into_dataclasses(args=argv)
    distillation = distill_args.distillation_config()
    if distillation is not None and not distill_args.teacher:
        raise HybridSparseError("--distill needs --teacher: the dense model the pruned one came from.")
    if ft.lora_mode not in ("masked", "remask"):
        raise HybridSparseError(f"--lora_mode {ft.lora_mode!r}: choose masked or remask.")
    preflight(model_args.model, (ft.seqlen,), calib=ft.data, save=ft.final_dir)

    from ..checkpoint.saving import save_pruned
    from ..data.calibration import lm_dataset
    from ..evaluation.perplexity import perplexity
    from ..models import load_model_and_tokenizer
    from ..training.lora import get_sparse_peft_model, merge_sparse_lora
    from ..training.trainer import SparseTrainer

    model, tokenizer = load_model_and_tokenizer(model_args.model, model_args.dtype, model_args.device_map)
    distill: dict = {}
    if distillation is not None:
        from ..training.distill import check_tokenizers

        teacher, teacher_tokenizer = load_model_and_tokenizer(distill_args.teacher, model_args.dtype)
        check_tokenizers(tokenizer, teacher_tokenizer)
        distill = dict(teacher_model=teacher, distillation=distillation)
    train = lm_dataset(ft.data, tokenizer, ft.seqlen, ft.max_samples)

    def ppl(m) -> float:
        m.eval()
        return perplexity(m, tokenizer, ft.data, seqlen=ft.seqlen, max_windows=ft.eval_windows).perplexity

    before = ppl(model)
    say(f"perplexity before: {before:.3f}")
    target = model
    if ft.lora_r > 0:
        from peft import LoraConfig

        lora = LoraConfig(
            r=ft.lora_r,
            lora_alpha=ft.lora_alpha,
            target_modules=ft.lora_targets.split(","),
            task_type="CAUSAL_LM",
        )
        target = get_sparse_peft_model(model, lora, mode=ft.lora_mode)
    trainer = SparseTrainer(model=target, args=targs, train_dataset=train, **distill)
    trainer.train()
    if ft.lora_r > 0:
        model, merge_report = merge_sparse_lora(target)
        say(
            f"merged LoRA ({merge_report.mode}); largest share of an update removed by re-masking: "
            f"{merge_report.max_removed_fraction:.4f}"
        )
    after = ppl(model)
    say(f"perplexity after:  {after:.3f}")
    final = ft.final_dir or f"{targs.output_dir}/final"
    save_pruned(
        model,
        final,
        tokenizer=tokenizer,
        report={"perplexity_before": before, "perplexity_after": after, "steps": trainer.state.global_step},
    )
    say(f"saved to {final}")
    return 0
