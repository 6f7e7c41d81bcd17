"""Flat-LoRA in a transformers ``Trainer``: one extra line (``add_flatlora``). Offline, CPU, ~15 s.

A tiny Llama-architecture model is built from a config (no download), given LoRA adapters with
peft, and fine-tuned by the stock ``Trainer`` on a toy language made in code (each sequence
counts up by a fixed stride modulo the vocabulary). The run uses gradient accumulation, gradient
clipping, evaluation and checkpoints in the middle of training, then resumes from a checkpoint.
At the end it checks that the base weights are bitwise the ones it started from.

    python examples/hf_trainer.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from flatlora_optim.integrations.huggingface import add_flatlora

VOCAB, LENGTH = 32, 12


def toy_language(n: int, seed: int) -> list:
    """Sequences start anywhere and count up by a stride of 1-3 modulo VOCAB."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (1,), generator=gen)
        stride = torch.randint(1, 4, (1,), generator=gen)
        ids = (start + stride * torch.arange(LENGTH)) % VOCAB
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def build_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
    )
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=modules, lora_dropout=0.0)
    return get_peft_model(LlamaForCausalLM(config), lora)


def train(output_dir: Path, resume_from=None):
    model = build_model()
    base_bits = {n: p.detach().view(torch.int32).clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=40,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=10,
        save_strategy="steps",
        save_steps=20,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=toy_language(256, seed=0), eval_dataset=toy_language(64, seed=1))
    trainer.remove_callback(PrinterCallback)  # keep this demo's output short
    callback = add_flatlora(trainer, rho=0.05, seed=0)  # <- the one Flat-LoRA line
    before = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=resume_from)
    after = trainer.evaluate()["eval_loss"]
    unchanged = all(torch.equal(base_bits[n], p.detach().view(torch.int32)) for n, p in model.named_parameters() if not p.requires_grad)
    return trainer, callback.flat, before, after, unchanged


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest (and kind to a shared machine)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        trainer, flat, before, after, unchanged = train(out / "run")
        print(f"eval loss {before:.3f} -> {after:.3f} after {trainer.state.global_step} optimizer steps")
        print(f"Flat-LoRA: {flat}")
        print(f"schedule length = Trainer's optimizer steps: {flat.schedule.total_steps} == {trainer.state.max_steps}")
        print(f"base weights bitwise unchanged: {unchanged}")
        saved = torch.load(out / "run" / "checkpoint-20" / "optimizer.pt", weights_only=True)["flatlora"]
        print(f"checkpoint-20 holds the Flat-LoRA state: step={saved['step']} seed={saved['seed']} T={saved['total_steps']}")

        trainer_b, flat_b, _, after_b, unchanged_b = train(out / "resumed", resume_from=str(out / "run" / "checkpoint-20"))
        print(
            f"resumed from checkpoint-20: Flat-LoRA step {flat_b.step_count} (sigma now {flat_b.sigma:.4f}), eval loss {after_b:.3f} "
            f"(uninterrupted {after:.3f}); base weights bitwise unchanged: {unchanged_b}"
        )


if __name__ == "__main__":
    main()
