"""peft end to end: get_peft_model on tiny Llama and GPT-2 models (built from configs), AdamW wrapped.

For both architectures (Llama: ``nn.Linear`` projections; GPT-2: transposed ``Conv1D`` weights,
``fan_in_fan_out=True``): discovery finds exactly the adapted layers, the weights really carry
the regenerated noise during the step (in the right orientation), the LoRA gradient is the
gradient at the perturbed weights, the adapters train, and every base weight is bitwise
unchanged at the end -- also after merging the adapters into a copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import bits
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from flatlora_optim import FlatLoRA

VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama():
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16
    )
    return LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)


def tiny_gpt2():
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0, init_lora_weights=False)
    return GPT2LMHeadModel(cfg), lora


ARCHS = {
    "llama": (tiny_llama, {f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}, False),
    "gpt2": (tiny_gpt2, {f"base_model.model.transformer.h.{i}.attn.c_attn" for i in range(2)}, True),
}


def token_batches(n: int, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 8), generator=gen) for _ in range(n)]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_get_peft_model_train_with_flatlora(arch):
    build, expected_targets, transposed = ARCHS[arch]
    torch.manual_seed(0)
    base, lora_config = build()
    model = get_peft_model(base, lora_config)  # init_lora_weights=False: B != 0, so W + sBA != W from the start
    frozen = {n: bits(p) for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(adapters) == 2 * len(expected_targets)
    opt = FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), model, rho=0.1, total_steps=6, seed=0)
    assert {t.name for t in opt.targets} == expected_targets
    assert all(t.transposed == transposed for t in opt.targets)
    probe = opt.targets[0]
    probed_layer = dict(model.named_modules())[probe.name]

    batches = token_batches(12)
    losses = []
    for step in range(6):
        window = batches[2 * step : 2 * step + 2]
        for ids in window:  # gradient accumulation: 2 micro-batches, one draw
            with opt.perturbed():
                loss = lm_loss(model, ids) / 2
                perturbed_bits = bits(probed_layer.base_layer.weight)
                if step > 0:
                    # the weight carries exactly the regenerated noise, rows = output units (columns of a Conv1D weight)
                    noise = opt.regenerate_noise(probe.name)
                    change = probed_layer.base_layer.weight.detach() - frozen[probe.name + ".base_layer.weight"].view(torch.float32)
                    assert torch.allclose((change.t() if transposed else change).to(noise.dtype), noise, rtol=0, atol=1e-7)
                    assert noise.abs().max() > 0
            loss.backward()
            losses.append(loss.item() * 2)
        if step == 3:
            # the LoRA gradient is the gradient at W + e: recompute it on a copy holding the perturbed weights
            reference = copy.deepcopy(model)
            with opt.perturbed():
                perturbed_state = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    p.grad = None
                    if n in perturbed_state:
                        p.copy_(perturbed_state[n])
            for ids in window:
                (lm_loss(reference, ids) / 2).backward()
            assert not torch.equal(bits(perturbed_state[probe.name + ".base_layer.weight"]), frozen[probe.name + ".base_layer.weight"])
            for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=f"{n}: gradient not taken at W + e")
        assert torch.equal(perturbed_bits, frozen[probe.name + ".base_layer.weight"]) == (step == 0)  # sigma_0 = 0
        opt.step()
        opt.zero_grad()

    assert opt.step_count == 6 and not opt.is_perturbed
    assert all(torch.isfinite(torch.tensor(losses)))
    # base weights bitwise unchanged, adapters trained
    after = {n: bits(p) for n, p in model.named_parameters() if not p.requires_grad}
    assert after.keys() == frozen.keys()
    for name in frozen:
        assert torch.equal(frozen[name], after[name]), f"{name} changed"
    assert all(not torch.equal(adapters[n], p) for n, p in model.named_parameters() if p.requires_grad)
    # the usual peft exit still works: merging a copy gives W + sBA from the clean W
    layer = copy.deepcopy(probed_layer)
    delta = layer.get_delta_weight("default")
    layer.merge()
    expected = frozen[probe.name + ".base_layer.weight"].view(torch.float32) + delta
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)


def test_a_wrapper_used_after_merge_and_unload_says_to_build_a_new_one():
    """merge_and_unload() takes the adapters out of the model; the old wrapper's layers are merged, and the error used
    to say only "call model.unmerge_adapter()", which the returned model no longer has adapters for."""
    base, lora = tiny_llama()
    model = get_peft_model(base, lora)
    opt = FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3), model, rho=0.05, schedule="constant")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    merged = model.merge_and_unload()
    before = {name: bits(p) for name, p in merged.named_parameters()}
    with pytest.raises(ValueError, match=r"merge_and_unload\(\).*build a new optimizer and FlatLoRA"):
        with opt.perturbed():
            merged(input_ids=ids)
    assert all(torch.equal(bits(p), before[name]) for name, p in merged.named_parameters())
