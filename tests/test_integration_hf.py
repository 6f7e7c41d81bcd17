"""transformers Trainer + Flat-LoRA, end to end on tiny models built from configs (no download).

What is checked against the real Trainer loop: the noise is in the weights for every micro-batch
of an optimizer step (one draw per step, the same for all micro-batches, of the size the schedule
says), it is gone before the update, evaluation and checkpoints see clean weights, the schedule
length is the Trainer's real optimizer-step count, and a resumed run continues the noise stream.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import DDP_KINDS, assert_ddp_matches_one_process, bits, run_as_two_ranks
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from flatlora_optim import FlatLoRA, inject_lora, lora_parameters
from flatlora_optim.integrations.huggingface import FlatLoRACallback, add_flatlora

VOCAB = 64
PROBED = "model.layers.0.self_attn.q_proj"  # a LoRALinear target of the tiny Llama


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny matrices: one intra-op thread is much faster than two fighting over a shared 2-core machine.

    transformers 4.x's TrainingArguments(bf16=True) sets ACCELERATE_MIXED_PRECISION in os.environ; undo it after the test.
    """
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama_with_lora() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16
    )
    model = LlamaForCausalLM(cfg)
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # B != 0, so W + sBA != W
    return model


def tiny_peft_gpt2():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(GPT2LMHeadModel(cfg), lora)


def lm_data(n: int, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (8,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def training_args(out, **kwargs) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kwargs)
    return TrainingArguments(**base)


def frozen_bits(model) -> dict:
    return {n: bits(p) for n, p in model.named_parameters() if not p.requires_grad}


def assert_same_bits(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed"


class Probe(TrainerCallback):
    """Records, inside the Trainer loop, what the weights look like at each event.

    Each training micro-batch's weights are read in the probed module's forward (a forward hook: the weights that
    micro-batch's forward and backward compute with); a checkpoint's rerun of the forward inside the backward, and
    forwards without grad (evaluation), are not recorded. Placed before the Flat-LoRA callback (constructor callbacks
    come before add_callback's), so at ``on_pre_optimizer_step`` it sees the weights before that callback's restore.
    """

    def __init__(self, module_name: str, clean: torch.Tensor):
        self.module_name = module_name
        self.clean = clean  # bits of the clean weight
        self.flat = None
        self.state = None
        self.micro = []  # (global_step, bits, sigma, relative noise) in each training micro-batch's forward
        self.clean_events = []  # (event, is_perturbed, weight bits equal to clean)

    def _weight(self, model):
        return dict(model.named_modules())[self.module_name].weight

    def _forward(self, module, args, output):
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return
        self._record(self.state, self._model)

    def _record(self, state, model):
        module = dict(model.named_modules())[self.module_name]
        weight = self._weight(model).detach()
        relative = None
        if hasattr(module, "delta_weight"):  # LoRALinear: the noise scale is the RMS of the rows of W + sBA
            clean = self.clean.view(weight.dtype)
            relative = ((weight - clean).norm() / (clean + module.delta_weight()).norm()).item()
        self.micro.append((state.global_step, bits(weight), self.flat.sigma, relative))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from flatlora_optim.integrations import find_flatlora

        self.flat, self.state, self._model = find_flatlora(optimizer), state, model
        dict(model.named_modules())[self.module_name].register_forward_hook(self._forward)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # the last micro-batch's backward has ended: add_flatlora released the noise before it, so it is out already
        self._clean_event("pre_optimizer_step", model)

    def _clean_event(self, event, model):
        self.clean_events.append((event, self.flat.is_perturbed, torch.equal(bits(self._weight(model)), self.clean)))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._clean_event("evaluate", model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._clean_event("save", model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._clean_event("step_end", model)


def check_noise_records(records, rho: float, total: int, clean: torch.Tensor, accum: int) -> dict:
    """One draw per optimizer step, shared by its micro-batches, of relative size ~ sigma_t; none at t = 0."""
    by_step: dict = {}
    for step, weight_bits, sigma, relative in records:
        by_step.setdefault(step, []).append((weight_bits, sigma, relative))
    for step, seen in by_step.items():
        assert len(seen) == accum, f"step {step}: {len(seen)} micro-batch records"
        assert all(torch.equal(seen[0][0], b) for b, _, _ in seen), f"step {step}: micro-batches saw different weights"
        sigma = seen[0][1]
        assert sigma == pytest.approx(rho * 0.5 * (1 - math.cos(math.pi * step / total)))
        if step == 0:
            assert torch.equal(seen[0][0], clean)  # sigma_0 = 0: no noise
            continue
        relative = seen[-1][2]  # ||W~ - W|| / ||W + sBA||, measured before the update
        assert 0.6 * sigma < relative < 1.4 * sigma, f"step {step}: relative noise {relative} vs sigma {sigma}"
    draws = [by_step[s][0][0] for s in sorted(by_step) if s > 0]
    assert all(not torch.equal(a, b) for a, b in zip(draws, draws[1:])), "consecutive steps reused a draw"
    return {s: v[0][0] for s, v in by_step.items()}


def test_trainer_accumulation_eval_checkpoints_and_resume(tmp_path):
    rho, total = 0.1, 12
    model = tiny_llama_with_lora()
    initial = frozen_bits(model)
    clean = bits(dict(model.named_modules())[PROBED].weight)
    data = lm_data(20)
    args = training_args(tmp_path / "a", max_steps=total, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=6)
    probe = Probe(PROBED, clean)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4], callbacks=[probe])
    callback = add_flatlora(trainer, rho=rho, seed=3)
    trainer.train()
    flat = callback.flat

    # the schedule length and the step count are the Trainer's optimizer steps (20 samples / (2 x 2) = 5 per epoch)
    assert isinstance(trainer.optimizer.optimizer, FlatLoRA) and trainer.optimizer.optimizer is flat
    assert flat.schedule.total_steps == trainer.state.max_steps == total
    assert flat.step_count == trainer.state.global_step == total
    # noise in every micro-batch of every step, one draw per step
    noise_a = check_noise_records(probe.micro, rho, total, clean, accum=2)
    assert len(noise_a) == total
    # evaluation, saving and step ends only ever saw clean weights
    events = {e for e, _, _ in probe.clean_events}
    assert events == {"evaluate", "save", "step_end", "pre_optimizer_step"}
    assert all(not perturbed and is_clean for _, perturbed, is_clean in probe.clean_events)
    # the base weights are bitwise unchanged; the adapters trained
    assert_same_bits(initial, frozen_bits(model))
    # checkpoints on disk hold the clean base weights and the Flat-LoRA state
    for step in (6, 12):
        ckpt = tmp_path / "a" / f"checkpoint-{step}"
        saved = load_file(str(ckpt / "model.safetensors"))
        frozen_saved = {k: bits(v) for k, v in saved.items() if k in initial}
        assert frozen_saved.keys() == initial.keys() - {"lm_head.weight"} or frozen_saved.keys() == initial.keys()
        assert_same_bits({k: initial[k] for k in frozen_saved}, frozen_saved)
        opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        assert opt_state["flatlora"]["step"] == step and opt_state["flatlora"]["seed"] == 3
        assert opt_state["flatlora"]["total_steps"] == total
    final_a = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # resume from checkpoint-6 in a fresh trainer: the schedule and the noise stream continue
    model_b = tiny_llama_with_lora()
    probe_b = Probe(PROBED, clean)
    args_b = training_args(tmp_path / "b", max_steps=total, eval_strategy="steps", eval_steps=4)
    trainer_b = Trainer(model=model_b, args=args_b, train_dataset=data, eval_dataset=data[:4], callbacks=[probe_b])
    callback_b = add_flatlora(trainer_b, rho=rho, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the output_dir differs from the checkpoint's
        trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    flat_b = callback_b.flat
    assert flat_b.step_count == trainer_b.state.global_step == total
    assert flat_b.schedule.total_steps == total
    noise_b = check_noise_records(probe_b.micro, rho, total, clean, accum=2)
    assert sorted(noise_b) == list(range(6, total))  # the resumed run starts at step 6, not 0
    for step, weight_bits in noise_b.items():
        assert torch.equal(weight_bits, noise_a[step]), f"step {step}: the resumed run drew different noise"
    assert_same_bits(initial, frozen_bits(model_b))
    for name, value in final_a.items():
        assert torch.equal(value, dict(model_b.named_parameters())[name]), f"{name}: resumed run diverged"


class CustomLossTrainer(Trainer):
    """A TRL-style subclass: its own loss, the Trainer loop untouched."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), inputs["labels"][:, 1:].reshape(-1))
        return (loss, logits) if return_outputs else loss


def test_trainer_epochs_peft_gpt2_subclass_bf16_checkpointing(tmp_path):
    model = tiny_peft_gpt2()
    initial = frozen_bits(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    target = "base_model.model.transformer.h.0.attn.c_attn"
    clean = bits(dict(model.named_modules())[target].base_layer.weight)
    data = lm_data(10, seed=1)  # 5 micro-batches of 2 per epoch -> 3 optimizer steps per epoch (the last one short)
    # recomputation during backward happens at W + e too (non-reentrant: older transformers default to reentrant,
    # which with frozen embeddings needs model.enable_input_require_grads(), with or without Flat-LoRA)
    checkpointing = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    args = training_args(tmp_path, num_train_epochs=2, bf16=True, **checkpointing)
    probe = Probe(target + ".base_layer", clean)
    trainer = CustomLossTrainer(model=model, args=args, train_dataset=data, callbacks=[probe])
    callback = add_flatlora(trainer, rho=0.05, seed=0)
    trainer.train()
    flat = callback.flat

    naive = len(data) // (2 * 2) * 2  # dataset size / (batch x accumulation) x epochs = 4: wrong
    assert flat.schedule.total_steps == trainer.state.max_steps == 6 != naive
    assert flat.step_count == trainer.state.global_step == 6
    assert {t.name for t in flat.targets} == {"base_model.model.transformer.h.0.attn.c_attn", "base_model.model.transformer.h.0.mlp.c_fc"}
    # the short last step of each epoch has one micro-batch, the others two; every step >= 1 was perturbed
    steps = sorted({s for s, _, _, _ in probe.micro})
    assert steps == list(range(6))
    for step, weight_bits, _, _ in probe.micro:
        assert torch.equal(weight_bits, clean) == (step == 0)
    assert_same_bits(initial, frozen_bits(model))
    assert all(not torch.equal(lora_before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_callback_with_a_flatlora_passed_to_the_trainer(tmp_path):
    model = tiny_llama_with_lora()
    initial = frozen_bits(model)
    flat = FlatLoRA(torch.optim.AdamW(list(lora_parameters(model)), lr=1e-2), model, rho=0.1, total_steps=1000, seed=0)
    args = training_args(tmp_path, max_steps=3, gradient_accumulation_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data(6), optimizers=(flat, None), callbacks=[FlatLoRACallback()])
    trainer.train()
    assert flat.schedule.total_steps == 3  # the placeholder 1000 was replaced by the Trainer's count
    assert flat.step_count == 3 and not flat.is_perturbed
    assert_same_bits(initial, frozen_bits(model))


class FailingTrainer(Trainer):
    """Raises in the middle of an accumulation window, while the noise is in the weights."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.state.global_step == 2 and self.optimizer.optimizer.is_perturbed:
            raise KeyboardInterrupt("stop")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_an_exception_leaving_train_restores_the_weights(tmp_path):
    model = tiny_llama_with_lora()
    initial = frozen_bits(model)
    trainer = FailingTrainer(model=model, args=training_args(tmp_path, max_steps=5), train_dataset=lm_data(20))
    callback = add_flatlora(trainer, rho=1.0, schedule="constant")
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert callback.flat.step_count == 2 and not callback.flat.is_perturbed
    assert_same_bits(initial, frozen_bits(model))


def test_callback_without_a_flatlora_optimizer_says_what_to_do(tmp_path):
    model = tiny_llama_with_lora()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=lm_data(4), callbacks=[FlatLoRACallback()])
    with pytest.raises(RuntimeError, match="add_flatlora"):
        trainer.train()
    with pytest.raises(ValueError, match="once"):
        add_flatlora(trainer)
        add_flatlora(trainer)


def test_add_flatlora_refuses_total_steps_clearly(tmp_path):
    """The schedule length comes from the Trainer; a total_steps keyword once failed inside FlatLoRA with a TypeError."""
    trainer = Trainer(model=tiny_llama_with_lora(), args=training_args(tmp_path, max_steps=1), train_dataset=lm_data(4))
    with pytest.raises(ValueError, match="total_steps from the Trainer.*max_steps"):
        add_flatlora(trainer, rho=0.05, total_steps=3)


def test_importing_the_package_and_integrations_index_pulls_in_no_framework():
    code = (
        "import sys, flatlora_optim, flatlora_optim.integrations; "
        "heavy = [m for m in ('transformers', 'lightning', 'accelerate', 'peft') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_trainer_with_host_restore_trains_as_with_exact_restore(tmp_path):
    """restore='host' under the Trainer (noise held by perturb() over two micro-batches, non-reentrant gradient
    checkpointing, bf16): the trained adapters are exact restore's, bit for bit, and the frozen weights come back
    bitwise."""
    trained = {}
    for restore in ("exact", "host"):
        model = tiny_peft_gpt2()
        initial = frozen_bits(model)
        args = training_args(tmp_path / restore, max_steps=3, bf16=True, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = CustomLossTrainer(model=model, args=args, train_dataset=lm_data(12, seed=2))
        callback = add_flatlora(trainer, rho=0.1, seed=0, restore=restore)
        trainer.train()
        assert callback.flat.restore_strategy == restore and callback.flat.step_count == 3
        assert_same_bits(initial, frozen_bits(model))
        trained[restore] = {n: bits(p) for n, p in model.named_parameters() if p.requires_grad}
    for name, value in trained["exact"].items():
        assert torch.equal(value, trained["host"][name]), f"{name}: host restore trained other adapters"


def test_trainer_with_host_restore_writes_layers_back_during_the_last_backward(tmp_path, monkeypatch):
    """add_flatlora releases the noise before the last micro-batch's backward, so host restore writes each layer back
    as soon as that backward is done with it (inside the backward), not all at once after it; the earlier micro-batch's
    backward writes nothing back (its step's noise is still needed)."""
    from flatlora_optim.perturbation import Perturber

    early = []  # (global step, micro-batch of the step, inside a backward)
    restore_early = Perturber.restore_early

    def recording(self, p):
        early.append((trainer.state.global_step, seen[0], torch._C._current_graph_task_id() != -1))
        return restore_early(self, p)

    monkeypatch.setattr(Perturber, "restore_early", recording)
    seen = [0]

    class MicroBatches(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen[0] = 0

        def on_substep_end(self, args, state, control, **kwargs):
            seen[0] += 1

    model = tiny_peft_gpt2()  # its c_fc computes on an input that needs a gradient: written back early (c_attn's input does not)
    initial = frozen_bits(model)
    trainer = CustomLossTrainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=lm_data(12, seed=2),
                                callbacks=[MicroBatches()])
    callback = add_flatlora(trainer, rho=0.1, seed=0, restore="host", schedule="constant")
    trainer.train()
    assert callback.flat.step_count == 3
    assert {step for step, _, _ in early} == {0, 1, 2}  # every step wrote layers back early
    assert all(micro == 1 and in_backward for _, micro, in_backward in early)  # in the second (last) micro-batch's backward
    assert_same_bits(initial, frozen_bits(model))


class RetainedGraphTrainer(CustomLossTrainer):
    """A training step with two backward passes through one graph (the first keeps it)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        loss = self.compute_loss(model, inputs)
        self.accelerator.backward(loss, retain_graph=True)
        self.accelerator.backward(0.5 * loss)  # the same graph again: still at W + e
        return loss.detach()


@pytest.mark.parametrize("restore", ["exact", "host"])
def test_a_backward_that_keeps_its_graph_does_not_release_the_noise(tmp_path, restore):
    """Releasing before a retain_graph backward would restore at its end, and the second backward through the graph
    would then raise (the weights it needs were written back); the release waits for the backward that frees it."""
    model = tiny_peft_gpt2()
    initial = frozen_bits(model)
    trainer = RetainedGraphTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=lm_data(8, seed=3))
    callback = add_flatlora(trainer, rho=0.1, seed=0, restore=restore, schedule="constant")
    trainer.train()
    assert callback.flat.step_count == 2 and not callback.flat.is_perturbed
    assert_same_bits(initial, frozen_bits(model))


class ChunkedTrainer(CustomLossTrainer):
    """A training step with two forward and backward passes (the micro-batch in two chunks), each through
    accelerator.backward: the first one of the last micro-batch already looks like the step's last backward."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        total = 0.0
        for half in (slice(0, 1), slice(1, 2)):
            loss = self.compute_loss(model, {k: v[half] for k, v in inputs.items()}) / 2
            self.accelerator.backward(loss)
            total += loss.detach()
        return total


@pytest.mark.parametrize("restore", ["exact", "host"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_every_forward_of_a_step_with_several_backward_passes_computes_at_the_noise(tmp_path, restore, accumulation):
    """Found by review: the first backward of the last micro-batch released the noise, and the second chunk's forward
    computed at W (every restore). The step's draw now comes back before that forward."""
    model = tiny_peft_gpt2()
    initial = frozen_bits(model)
    layer = dict(model.named_modules())["base_model.model.transformer.h.0.mlp.c_fc.base_layer"]
    clean = bits(layer.weight)
    at_clean = []
    layer.register_forward_hook(lambda m, a, o: at_clean.append(torch.equal(bits(m.weight), clean))
                                if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1 else None)
    args = training_args(tmp_path, max_steps=3, gradient_accumulation_steps=accumulation)
    trainer = ChunkedTrainer(model=model, args=args, train_dataset=lm_data(12, seed=2))
    callback = add_flatlora(trainer, rho=0.1, seed=0, restore=restore, schedule="constant")
    trainer.train()
    assert len(at_clean) == 3 * 2 * accumulation and not any(at_clean)
    assert callback.flat.step_count == 3 and not callback.flat.is_perturbed
    assert not any(getattr(hook, "__self__", None) is callback for hook in model._forward_pre_hooks.values())  # gone after train()
    assert_same_bits(initial, frozen_bits(model))


def _one_sample_data(n: int) -> list:
    """``n`` copies of one sample: every batch is the same whatever the sampler, so two DDP ranks of batch b average
    the gradient one process computes on a batch b."""
    (row,) = lm_data(1, seed=4)
    return [{"input_ids": row["input_ids"].clone(), "labels": row["labels"].clone()} for _ in range(n)]


def _train_tiny_llama(out_dir: str, restore: str, rank_noise: str, **args) -> dict:
    torch.set_num_threads(1)
    model = tiny_llama_with_lora()
    initial = frozen_bits(model)
    trainer = Trainer(model=model, args=training_args(out_dir, max_steps=3, **args), train_dataset=_one_sample_data(16))
    callback = add_flatlora(trainer, rho=0.5, schedule="constant", seed=0, restore=restore, rank_noise=rank_noise)
    trainer.train()
    return {"clean": all(torch.equal(initial[k], v.cpu()) for k, v in frozen_bits(model).items()),
            "steps": callback.flat.step_count, "lora": [p.detach().cpu() for p in lora_parameters(model)]}


@pytest.mark.parametrize("kind", DDP_KINDS)
@pytest.mark.parametrize("restore", ["exact", "host"])
def test_ddp_on_two_processes_matches_one_process(tmp_path, restore, kind):
    """The Trainer under DDP (2 CPU processes with gloo; 2 GPUs with NCCL where there are; accumulation 2, batch 2 per
    rank, one sample repeated so every batch is the same): every rank restores its frozen weights bitwise, and with
    shared noise the LoRA weights are one process's on the same batches (tolerance DDP_TOLERANCE: the ranks' gradients
    are averaged); with the default independent noise they are not (each rank drew its own)."""
    backend = "gloo" if kind == "cpu" else "nccl"
    ranks = {noise: run_as_two_ranks(tmp_path / noise, functools.partial(_train_tiny_llama, str(tmp_path / noise), restore, noise,
                                                                          use_cpu=kind == "cpu", ddp_backend=backend))
             for noise in ("shared", "independent")}
    single = _train_tiny_llama(str(tmp_path / "single"), restore, "independent", use_cpu=kind == "cpu")
    assert single["clean"] and single["steps"] == 3
    assert_ddp_matches_one_process(ranks, single["lora"], kind, steps=3)


@pytest.mark.parametrize("flag", ["should_epoch_stop", "should_training_stop"])
def test_a_stop_in_the_middle_of_an_accumulation_window_restores_before_the_epochs_end(tmp_path, flag):
    """A callback that stops the epoch (or the run) after a micro-batch that is not the window's last: the Trainer leaves
    the loop there, and the other callbacks' on_epoch_end once saw the noise still in."""
    model = tiny_llama_with_lora()
    before = frozen_bits(model)
    seen = []

    class StopMidWindow(TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                setattr(control, flag, True)

        def on_epoch_end(self, args, state, control, **kwargs):
            seen.append(flat_callback.flat.is_perturbed)

    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6), train_dataset=lm_data(20), callbacks=[StopMidWindow()])
    flat_callback = add_flatlora(trainer, rho=0.3, schedule="constant")
    trainer.train()
    assert seen and not any(seen), "an on_epoch_end saw the noise in"
    assert_same_bits(before, frozen_bits(model))


def test_train_again_without_resuming_restarts_the_noise_schedule_with_the_trainer(tmp_path):
    """A second train() of the same Trainer counts from 0 and builds its LR schedule anew; Flat-LoRA went on from where
    the first run ended (sigma at rho from the first step, no ramp), silently. It restarts with the Trainer, and says so."""
    model = tiny_llama_with_lora()
    before = frozen_bits(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=lm_data(20))
    flat_callback = add_flatlora(trainer, rho=0.3)
    trainer.train()
    assert flat_callback.flat.step_count == 3
    with pytest.warns(UserWarning, match="noise schedule restarts at 0"):
        trainer.train()
    assert flat_callback.flat.step_count == trainer.state.global_step == 3
    assert_same_bits(before, frozen_bits(model))


def test_virtual_mode_through_add_flatlora_trains_as_in_place_mode(tmp_path):
    """``mode="virtual"`` is passed through: the same LoRA weights as in-place exact restore, bit for bit, and the noise
    is really applied (rho 0 gives other weights)."""

    def lora_after(**kwargs):
        model = tiny_llama_with_lora()
        before = frozen_bits(model)
        trainer = Trainer(model=model, args=training_args(tmp_path / str(len(kwargs)), max_steps=3), train_dataset=lm_data(12))
        add_flatlora(trainer, schedule="constant", **kwargs)
        trainer.train()
        assert_same_bits(before, frozen_bits(model))
        return [p.detach().clone() for p in lora_parameters(model)]

    virtual, inplace, plain = lora_after(rho=0.3, mode="virtual"), lora_after(rho=0.3), lora_after(rho=0.0, restore="exact")
    assert all(torch.equal(a, b) for a, b in zip(virtual, inplace))
    assert not all(torch.equal(a, b) for a, b in zip(virtual, plain))


class OutOfMemoryOnce(CustomLossTrainer):
    """Raises accelerate's out-of-memory text once, at the third step's loss, while the noise is in."""

    fired = False

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.state.global_step == 2 and not self.fired:
            self.fired = True
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_auto_find_batch_size_restarting_the_loop_after_an_out_of_memory_step(tmp_path):
    """accelerate catches the error inside train() and runs the training loop again with a smaller batch; the failed
    step's noise was still in when the loop began again (and the schedule's restart refused to run)."""
    model = tiny_llama_with_lora()
    before = frozen_bits(model)
    trainer = OutOfMemoryOnce(model=model, args=training_args(tmp_path, max_steps=5, auto_find_batch_size=True, per_device_train_batch_size=4),
                              train_dataset=lm_data(40))
    flat_callback = add_flatlora(trainer, rho=0.3, schedule="constant")
    with pytest.warns(UserWarning, match="auto_find_batch_size starting the loop again"):  # at Flat-LoRA step 2
        trainer.train()
    assert trainer.fired and trainer.state.global_step == flat_callback.flat.step_count == 5
    assert_same_bits(before, frozen_bits(model))


@pytest.mark.parametrize("kwargs, error", [(dict(restore="bogus"), ValueError), (dict(rho=-0.1), ValueError),
                                           (dict(schedule="cosin"), ValueError), (dict(rhoo=0.1), TypeError)])
def test_add_flatlora_checks_its_arguments_at_the_call(tmp_path, kwargs, error):
    """A wrong setting is refused by add_flatlora itself, before it installs anything: the Trainer stays as it was (no
    callback added, create_optimizer and train untouched), so a corrected call goes through."""
    trainer = Trainer(model=tiny_llama_with_lora(), args=training_args(tmp_path, max_steps=1), train_dataset=lm_data(4))
    create_optimizer, train = trainer.create_optimizer, trainer.train
    with pytest.raises(error):
        add_flatlora(trainer, **kwargs)
    assert not any(isinstance(c, FlatLoRACallback) for c in trainer.callback_handler.callbacks)
    assert trainer.create_optimizer == create_optimizer and trainer.train == train
    assert isinstance(add_flatlora(trainer, rho=0.1), FlatLoRACallback)
