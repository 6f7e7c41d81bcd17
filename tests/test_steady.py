"""A step keeps the last step's reads of the layers while none of them changed (``flatlora_optim.steady``): the same
bits as reading them anew, and every change that matters is seen."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_frozen_unchanged, bits, frozen_weights
from torch import nn

from flatlora_optim import FlatLoRA

pytest.importorskip("peft")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _peft_llama(dtype: str = "float32"):
    """A two-layer peft Llama (LoRA r=8 on all seven projections, a trained-looking B) with a second adapter."""
    import peft
    from step_time import PROJECTIONS, build_model

    model = build_model(dict(hidden=32, layers=2, mlp=64, vocab=64, heads=4, seq=16, dtype=dtype), torch.device("cpu"))
    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _factors(model):
    """Every adapter's factors (both adapters: the active one gets gradients)."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


def _ids(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))


def _layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _train(change, cold: bool, steps: int = 3, dtype: str = "float32"):
    """``steps`` steps of a fresh model, ``change(model)`` after the first; with ``cold`` every step reads and checks the
    layers anew. Returns each step's LoRA gradients, the frozen weights' bits before and after, and the model."""
    model = _peft_llama(dtype)
    opt = FlatLoRA(torch.optim.SGD(list(_factors(model)), lr=0.1), model, rho=0.1, schedule="constant", seed=5)
    grads = []
    for step in range(steps):
        if step == 1:
            change(model)
        before = frozen_weights(model)
        if cold:
            opt._steady.forget()
        with opt.perturbed():
            loss = model(input_ids=_ids(step), labels=_ids(step)).loss
        loss.backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in _factors(model)])
        opt.step()
        opt.zero_grad()
        assert_frozen_unchanged(model, before)
    return grads, model


def _no_change(model):
    pass


def _switch_adapter(model):
    model.set_adapter("other")


def _disable_adapters(model):
    for layer in _layers(model)[::2]:
        layer.enable_adapters(False)


def _new_scaling(model):
    for layer in _layers(model)[::3]:
        layer.set_scale("default", 3.0)


def _swap_a_factors_storage(model):
    with torch.no_grad():
        for layer in _layers(model)[::2]:
            A = layer.lora_A["default"].weight
            A.data = (A.detach() * 2).clone()  # the same parameter, new storage (and values)


def _swap_base_weight_storage(model):
    with torch.no_grad():
        for layer in _layers(model)[1::2]:
            W = layer.base_layer.weight
            W.data = W.detach().clone() + 0.01  # the same parameter, new storage: the noise must go there


def _replace_base_weight(model):
    for layer in _layers(model)[::4]:
        W = layer.base_layer.weight
        layer.base_layer.weight = nn.Parameter(W.detach().clone() - 0.01, requires_grad=False)


def _same(a, b) -> bool:
    return all((x is None) == (y is None) and (x is None or torch.equal(bits(x), bits(y))) for x, y in zip(a, b))


CHANGES = [_no_change, _switch_adapter, _disable_adapters, _new_scaling, _swap_a_factors_storage, _swap_base_weight_storage,
           _replace_base_weight]


@pytest.mark.parametrize("change", CHANGES)
def test_kept_reads_give_the_bits_of_reading_every_layer_anew(change):
    """Between two steps, nothing or one change that alters what a step must read (another active adapter, adapters
    disabled, a new scaling, a factor's or a base weight's storage swapped through ``.data``, a base weight replaced):
    a run that keeps the last step's reads while the layers' state keys are unchanged gives, step by step, the LoRA
    gradients of a run that reads and checks every layer at every step, to the bit, and the frozen weights come back
    bitwise after each step (the noise went into the weights the model computes with)."""
    warm, _ = _train(change, cold=False)
    cold, _ = _train(change, cold=True)
    for step, (a, b) in enumerate(zip(warm, cold)):
        assert _same(a, b), step
    if change is not _no_change:  # the change moved the run: a missed change would have shown above
        unchanged, _ = _train(_no_change, cold=True)
        assert not _same(unchanged[1], cold[1])


def test_a_merged_adapter_is_refused_at_the_next_step():
    """Merging an adapter between steps (``merge_adapter()`` writes through ``.data`` and marks the layers merged) is seen
    although no parameter moved: the next step raises the merged-adapter error before writing anything."""
    model = _peft_llama()
    opt = FlatLoRA(torch.optim.SGD(list(_factors(model)), lr=0.1), model, rho=0.1, schedule="constant", seed=5)
    with opt.perturbed():
        loss = model(input_ids=_ids(0), labels=_ids(0)).loss
    loss.backward()
    opt.step()
    model.merge_adapter()
    merged = frozen_weights(model)
    with pytest.raises(ValueError, match="merged"):
        opt.perturb()
    assert not opt.is_perturbed
    assert_frozen_unchanged(model, merged)


@pytest.fixture
def recorded():
    """The CUDA path's host work on CPU (host_time's stub kernel), recording what each step's row stds were given:
    ``(layer table, adapter rows table, factors table, adapters list, std scales)`` per step."""
    import host_time

    seen = []

    class Recording(host_time.StubKernel):
        def row_stds(self, table, adapters, std_scales, out):
            rows, factors, _ = table.adapter_tables(adapters, std_scales)
            seen.append((table, rows.clone(), factors.clone(), adapters, list(std_scales)))
            out.fill_(1e-3)

    with host_time.stub_kernel(Recording()):
        yield seen


def _assert_tables_of_the_model_now(opt, entry):
    """``entry``'s tables are those built from scratch for the model as it is now."""
    from flatlora_optim.grouped import _adapter_args
    from flatlora_optim.kernels.layer_table import LayerTable, adapter_rows

    table, rows, factors, _, std_scales = entry
    fresh = LayerTable([t.rows() for t in opt.targets])
    assert torch.equal(table.layers, fresh.layers)  # every layer's address, a swapped or replaced weight's new storage
    expected_rows, expected_factors, _ = adapter_rows([_adapter_args(t)[0] for t in opt.targets], std_scales, fresh.first_rows)
    assert torch.equal(rows, torch.tensor(expected_rows, dtype=torch.int64))
    assert torch.equal(factors, torch.tensor(expected_factors, dtype=torch.float64))


def _perturb_and_restore(opt):
    opt.perturb()
    opt.restore()


@pytest.mark.parametrize("change", CHANGES)
def test_the_step_wide_path_reads_the_layers_anew_after_a_change(change, recorded):
    """The CUDA path keeps more from step to step: the layer table (the layers' addresses) and the row-std kernel's
    adapter tables (the factors' addresses and ranks, the scalings). Through host_time's stub kernel on CPU: after each
    change, the next step's tables are those built from scratch for the model as it is now; with no change they are
    the very objects of the last step."""
    model = _peft_llama("bfloat16")
    opt = FlatLoRA(torch.optim.SGD(_factors(model), lr=0.1), model, rho=0.1, schedule="constant", seed=5)
    for step in range(3):
        if step == 2:
            change(model)
        _perturb_and_restore(opt)
    if change is _no_change:
        assert recorded[2][0] is recorded[1][0] and recorded[2][3] is recorded[1][3]  # the last step's table and adapters list
    _assert_tables_of_the_model_now(opt, recorded[2])


@pytest.mark.parametrize("change", [_switch_adapter, _new_scaling])
def test_tables_whose_upload_was_interrupted_are_built_again(change, recorded, monkeypatch):
    """Found by review: a Ctrl-C (or an allocation failure) while a changed adapter table was uploaded left the table
    kept for the step's adapters list, and every later step of unchanged keys used the tables of the adapters before
    the change (another adapter's addresses, old scalings). The interrupted step leaves the weights clean, and the next
    step's tables are those of the model as it is."""
    import flatlora_optim.kernels.layer_table as layer_table

    upload = layer_table._upload
    armed = []

    def interrupted_once(values, dtype, device):
        if armed:
            armed.clear()
            raise KeyboardInterrupt("interrupted upload")
        return upload(values, dtype, device)

    monkeypatch.setattr(layer_table, "_upload", interrupted_once)
    model = _peft_llama("bfloat16")
    opt = FlatLoRA(torch.optim.SGD(_factors(model), lr=0.1), model, rho=0.1, schedule="constant", seed=5)
    _perturb_and_restore(opt)
    change(model)
    armed.append(True)
    with pytest.raises(KeyboardInterrupt):
        opt.perturb()
    assert not opt.is_perturbed
    for _ in range(2):
        _perturb_and_restore(opt)
        _assert_tables_of_the_model_now(opt, recorded[-1])


def test_a_tensor_scaling_changed_in_place_is_seen(recorded):
    """Found by review: peft's ``scale_layer`` multiplies a tensor scaling in place (the same object, a new value);
    the state key held the object, so the step-wide path kept the old scaling. The key now holds its value."""
    model = _peft_llama("bfloat16")
    layers = _layers(model)
    for layer in layers:
        layer.set_scale("default", torch.tensor(2.0))
    opt = FlatLoRA(torch.optim.SGD(_factors(model), lr=0.1), model, rho=0.1, schedule="constant", seed=5)
    for _ in range(2):
        _perturb_and_restore(opt)
    for layer in layers[::2]:
        layer.scale_layer(0.25)
    _perturb_and_restore(opt)
    _assert_tables_of_the_model_now(opt, recorded[-1])


def test_kept_reads_hold_no_storage_the_model_let_go_of():
    """Found by review: the kept reads held each transposed layer's row view (GPT-2's ``Conv1D``, ``fan_in_fan_out``), so
    ``model.to(...)`` (which moves each parameter's ``.data``) left the old storage allocated until the next step,
    a copy of those weights for good if no step came (after training, or for a model moved off the GPU). The weights
    are now kept by weak reference and their views made again at each step: nothing of the old storage stays alive."""
    import gc
    import weakref

    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    opt = FlatLoRA(torch.optim.SGD(_factors(model), lr=0.1), model, rho=0.1, schedule="constant", seed=5)
    assert all(t.transposed for t in opt.targets)
    for step in range(2):
        with opt.perturbed():
            loss = model(input_ids=_ids(step), labels=_ids(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    # a weak reference to a storage lives exactly as long as the storage (torch keeps its Python object while any tensor
    # uses it); comparing addresses instead would see new tensors that the allocator put at a freed address
    old = [weakref.ref(t.weight.untyped_storage()) for t in opt.targets]
    model.to(torch.float64)
    gc.collect()
    assert all(storage() is None for storage in old)
    with opt.perturbed():  # and the next step reads the moved weights
        loss = model(input_ids=_ids(2), labels=_ids(2)).loss
    loss.backward()
    opt.step()
