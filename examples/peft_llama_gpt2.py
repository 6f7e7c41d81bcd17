"""peft + Flat-LoRA on a tiny Llama and a tiny GPT-2 (built from configs, no download). Offline, CPU, ~10 s.

``get_peft_model`` adds the adapters; ``FlatLoRA`` wraps the AdamW over them and finds the LoRA
layers itself (Llama's ``nn.Linear`` projections, GPT-2's transposed ``Conv1D`` ``c_attn``/``c_fc``).
A plain PyTorch loop with gradient accumulation trains on a toy language made in code. The demo
prints the loss, how much noise was in the weights during a step, and checks that every base
weight is bitwise unchanged at the end.

    python examples/peft_llama_gpt2.py
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from flatlora_optim import FlatLoRA

VOCAB, LENGTH, STEPS, ACCUM = 32, 12, 60, 2


def toy_batches(n: int, seed: int) -> list:
    """Sequences that count up by a stride of 1-3 modulo VOCAB, 8 per batch."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 8, 1), generator=gen)
    strides = torch.randint(1, 4, (n, 8, 1), generator=gen)
    return list((starts + strides * torch.arange(LENGTH)) % VOCAB)


def llama():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
    )
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    return LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=modules)


def gpt2():
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)


def run(name: str, build) -> None:
    torch.manual_seed(0)
    base, lora_config = build()
    model = get_peft_model(base, lora_config)
    base_bits = {n: p.detach().view(torch.int32).clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = [p for p in model.parameters() if p.requires_grad]
    opt = FlatLoRA(torch.optim.AdamW(adapters, lr=3e-3), model, rho=0.05, total_steps=STEPS, seed=0)
    probe = opt.targets[0]
    print(f"{name}: {len(opt.targets)} LoRA layers found, e.g. {probe.name} (transposed Conv1D: {probe.transposed})")

    batches, test = toy_batches(STEPS * ACCUM, seed=0), toy_batches(4, seed=1)

    def test_loss() -> float:
        with torch.no_grad():
            return sum(model(input_ids=b, labels=b).loss.item() for b in test) / len(test)

    before, largest_change = test_loss(), 0.0
    for step in range(STEPS):
        for ids in batches[step * ACCUM : (step + 1) * ACCUM]:
            with opt.perturbed():  # the same draw for both micro-batches of the step
                loss = model(input_ids=ids, labels=ids).loss / ACCUM
                clean = base_bits[f"{probe.name}.base_layer.weight"].view(torch.float32)
                change = (probe.weight.detach() - clean).abs().max().item()
                largest_change = max(largest_change, change)
            loss.backward()  # the weights are restored at the end of this backward
        opt.step()
        opt.zero_grad()
    unchanged = all(torch.equal(base_bits[n], p.detach().view(torch.int32)) for n, p in model.named_parameters() if not p.requires_grad)
    print(f"  test loss {before:.3f} -> {test_loss():.3f} in {opt.step_count} steps; sigma reached {opt.sigma:.3f}")
    print(f"  largest |W~ - W| of {probe.name} during a step: {largest_change:.2e}; base weights bitwise unchanged: {unchanged}")


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest (and kind to a shared machine)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    run("tiny Llama", llama)
    run("tiny GPT-2", gpt2)


if __name__ == "__main__":
    main()
