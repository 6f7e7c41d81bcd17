"""Discovery by introspection: peft Linear (incl. GPT-2 Conv1D), the built-in LoRALinear, targets=, skipping rules.

The other flavours (peft Embedding/Conv/DoRA/ParamWrapper, loralib, torchtune, custom) are in test_flavours.py."""

from __future__ import annotations

from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from conftest import assert_block_refused_untouched, assert_frozen_unchanged, frozen_weights, make_mlp
from torch import nn

from flatlora_optim import FlatLoRA, LoRALinear, discover_targets, inject_lora, lora_parameters
from flatlora_optim.optimizer import _check_one_device


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def _randomise_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _expected_row_norms(module, adapters):
    base = module.get_base_layer().weight.detach().double()
    w = base.t() if module.fan_in_fan_out else base
    delta = sum(module.scaling[a] * module.lora_B[a].weight.double() @ module.lora_A[a].weight.double() for a in adapters)
    return (w + delta).norm(dim=1) if adapters else w.norm(dim=1)


def _realised_row_std(opt, target):
    rows = target.rows().detach().double().clone()
    with opt.perturbed():
        noisy = target.rows().detach().double().clone()
    return (noisy - rows).std(dim=1)


def test_finds_every_peft_linear_in_a_llama():
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=projections))
    targets = discover_targets(model)
    assert len(targets) == 2 * 7
    assert all(t.flavour == "peft" and not t.transposed for t in targets)
    assert targets[0].name.endswith("self_attn.q_proj")
    assert targets[0].weight is targets[0].module.base_layer.weight


def test_gpt2_conv1d_rows_are_output_units():
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    _randomise_lora(model)
    targets = discover_targets(model)
    assert {t.transposed for t in targets} == {True}
    c_attn = next(t for t in targets if t.name.endswith("c_attn"))
    assert c_attn.weight.shape == (32, 96) and c_attn.shape == (96, 32)  # Conv1D stores (in, out)
    before = frozen_weights(model)
    opt = FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3), model, rho=0.5, schedule="constant")
    std = _realised_row_std(opt, c_attn)
    expected = 0.5 * _expected_row_norms(c_attn.module, ["default"]) / 32**0.5
    # 32 samples per row: check the rank correlation and the mean ratio (seeded; tolerance 15%)
    assert abs((std / expected).mean().item() - 1) < 0.15
    ids = torch.randint(0, 64, (2, 8))
    with opt.perturbed():
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert_frozen_unchanged(model, before)


def test_several_active_adapters_are_summed_and_inactive_ones_ignored():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"]))
    model.add_adapter("third", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"]))
    _randomise_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_adapter(["first", "second"])
    target = next(t for t in discover_targets(model) if t.module is layer)
    assert [a.name for a in target.adapters()] == ["first", "second"]
    from flatlora_optim.noise import row_norms

    torch.testing.assert_close(row_norms(target.rows(), target.adapters()), _expected_row_norms(layer, ["first", "second"]))


def test_disabled_adapters_count_only_the_base_weight():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    _randomise_lora(model)
    with model.disable_adapter():
        targets = discover_targets(model)
        assert all(t.adapters() == [] for t in targets)
    assert all(len(t.adapters()) == 1 for t in targets)


def test_merged_peft_adapter_is_a_clear_error():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, total_steps=10)


def test_lora_variants_other_than_dora_and_mica_are_refused_clearly():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, total_steps=10)  # DoRA is supported
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_variant["default"] = type("SomeVariant", (), {})()
    with pytest.raises(ValueError, match="SomeVariant.*not W \\+ sBA"):
        FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, total_steps=10)


def test_targets_restrict_by_suffix_regex_and_callable():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert len(discover_targets(model, targets=["q_proj"])) == 2
    assert len(discover_targets(model, targets=r".*layers\.0\..*")) == 2
    assert len(discover_targets(model, targets=lambda name, m: name.endswith("v_proj"))) == 2


def test_targets_can_add_a_plain_frozen_linear():
    model = make_mlp()
    model.append(nn.Linear(5, 5))
    targets = discover_targets(model, targets=["0", model[5]])
    assert [(t.name, t.flavour) for t in targets] == [("0", "flatlora"), ("5", "plain")]
    assert discover_targets(model)[-1].name == "4"  # plain Linear only when given as a module
    with pytest.warns(UserWarning, match=r"targets entries \['5'\] selected no LoRA layer"):
        assert [t.name for t in discover_targets(model, targets=["0", "5"])] == ["0"]  # names restrict


def test_a_targets_name_that_selects_no_lora_layer_is_named_in_a_warning():
    """A misspelt entry beside one that matches once left its layers without noise, silently."""
    import warnings

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with pytest.warns(UserWarning, match=r"targets entries \['v_prj'\] selected no LoRA layer") as caught:
        opt = FlatLoRA(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, total_steps=10,
                       targets=["q_proj", "v_prj"])
    assert [t.name.rsplit(".", 1)[-1] for t in opt.targets] == ["q_proj", "q_proj"]
    mine = [w for w in caught if "v_prj" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__, "the warning points at the library, not at the caller's line"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        discover_targets(model, targets=["q_proj", "v_proj"])
        discover_targets(model, targets=["layers.0.self_attn.q_proj", "v_proj"])  # a longer suffix matches too


def test_no_lora_found_says_what_was_searched():
    with pytest.raises(ValueError, match="No LoRA layers found in Sequential.*LoRALinear.*inject_lora"):
        FlatLoRA(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), nn.Sequential(nn.Linear(2, 2)), total_steps=10)
    with pytest.raises(ValueError, match="selected no LoRA layer"):
        discover_targets(make_mlp(), targets=["does_not_exist"])


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.proj = nn.Linear(8, 8)


def test_unsupported_peft_layers_warn_and_are_skipped():
    model = peft.get_peft_model(_Attention(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn", "proj"]))
    with pytest.warns(UserWarning, match="unsupported kinds: MultiheadAttention x1"):
        targets = discover_targets(model)
    assert [t.name.rsplit(".", 1)[-1] for t in targets] == ["proj"]
    with pytest.raises(ValueError, match="only LoRA layer kinds .* MultiheadAttention"):
        discover_targets(model, targets=["attn"])


def test_meta_weights_and_several_devices_are_refused():
    model = make_mlp()
    model[0].weight = nn.Parameter(torch.empty(32, 12, device="meta"), requires_grad=False)
    with pytest.raises(ValueError, match="meta device"):
        FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, total_steps=5)
    fake = [SimpleNamespace(weight=torch.zeros(1)), SimpleNamespace(weight=torch.zeros(1, device="meta"))]
    with pytest.raises(ValueError, match="several devices"):
        _check_one_device(fake)


def test_quantized_base_weight_is_skipped_with_one_warning():
    model = make_mlp()
    model[0].weight = nn.Parameter(torch.zeros(32, 12, dtype=torch.int8), requires_grad=False)
    model[2].weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.uint8), requires_grad=False)
    with pytest.warns(UserWarning, match="skips 2 LoRA layer.*quantized or packed: '0' \\(torch.int8 weight\\), '2' \\(torch.uint8") as record:
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, total_steps=5)
    assert len([w for w in record if "packed" in str(w.message)]) == 1
    assert [t.name for t in opt.targets] == ["4"]
    with pytest.raises(ValueError, match="found only 1 LoRA layer.*quantized or packed"):
        discover_targets(model, targets=["0"])


def test_inject_lora_keeps_the_function_and_freezes_the_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 6)
    before = model(x)
    inject_lora(model, ["0", "2"], r=2, alpha=4)
    torch.testing.assert_close(model(x), before)  # B = 0 at init
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(model, ["nope"])


def test_peft_is_not_imported_by_the_library():
    import subprocess
    import sys

    code = (
        "import sys, flatlora_optim, torch; m = torch.nn.Sequential(torch.nn.Linear(2, 2)); flatlora_optim.inject_lora(m, ['0']); "
        "flatlora_optim.discover_targets(m); print('peft' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_held_views_read_each_target_once_and_let_go_on_exit():
    """Inside ``held_views`` a target's weight, row view and row range are those read on entry
    (one read per step instead of several); outside, the target reads the live module again."""
    from flatlora_optim.targets import held_views

    model = nn.Sequential(LoRALinear(nn.Linear(6, 4), r=2, alpha=2), LoRALinear(nn.Linear(4, 3), r=2, alpha=2))
    first, second = discover_targets(model)
    weight = first.weight
    with held_views([first, second]):
        rows = first.rows()
        assert first.rows() is rows and first.weight is weight and first.row_range() == (0, 4) and not first.sharded
        with held_views([first]):  # nested: the outer block holds, the inner one changes nothing
            pass
        assert first.rows() is rows
        replacement = nn.Parameter(torch.zeros(5, 6), requires_grad=False)
        first.owner.weight = replacement  # not something a step does; shows what is read
        assert first.weight is weight
    assert first.weight is replacement and first.rows().shape == (5, 6) and first.row_range() == (0, 5)


def test_held_views_that_fail_on_entry_hold_nothing():
    from flatlora_optim.targets import held_views

    model = nn.Sequential(LoRALinear(nn.Linear(6, 4), r=2, alpha=2), LoRALinear(nn.Linear(4, 3), r=2, alpha=2))
    first, second = discover_targets(model)
    second.owner.weight = nn.Parameter(torch.zeros(2, 3, 4).transpose(0, 2), requires_grad=False)  # a 3-D view: no row view
    with pytest.raises(RuntimeError):
        with held_views([first, second]):
            pass
    assert first._held is None and second._held is None


def _two_layers_over(make_first, make_second):
    """A model of two LoRALinear layers whose base weights are ``make_first(big)`` and ``make_second(big)`` for one
    frozen 8 x 12 ``big`` tensor (not itself in the model)."""
    torch.manual_seed(0)
    big = torch.randn(8, 12)
    a, b = nn.Linear(6, 4, bias=False), nn.Linear(6, 4, bias=False)
    a.weight, b.weight = nn.Parameter(make_first(big), requires_grad=False), nn.Parameter(make_second(big), requires_grad=False)
    return nn.ModuleDict(dict(a=LoRALinear(a, 2, 4), b=LoRALinear(b, 2, 4)))


@pytest.mark.parametrize("first, second", [
    (lambda big: big[:4, :6], lambda big: big[:4, :6]),  # b.weight = nn.Parameter(a.weight.data): one view, two Parameters
    (lambda big: big[:4, :6], lambda big: big[2:6, 3:9]),  # overlapping slices
    (lambda big: big[:, ::2][:4, :6], lambda big: big[:, 2::2][:4, :6]),  # strided, sharing columns 2, 4, ...
], ids=["same memory", "overlapping slices", "strided, sharing elements"])
def test_weights_sharing_memory_through_different_tensors_are_refused(first, second):
    """Each would get noise added twice, and exact restore then left it in (raising that the weight was modified)."""
    model = _two_layers_over(first, second)
    before = frozen_weights(model)
    with pytest.raises(ValueError, match=r"'a' and 'b' hold base weights that share memory.*b\.weight = a\.weight"):
        discover_targets(model)
    with pytest.raises(ValueError, match="share memory"):
        FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, schedule="constant")
    assert_frozen_unchanged(model, before)


def test_weights_in_one_storage_without_a_common_element_are_perturbed_and_restored():
    """Interleaved columns of one tensor: the spans cross, no element is shared (checked element by element)."""
    model = _two_layers_over(lambda big: big[:4, 0::2], lambda big: big[:4, 1::2])
    before = frozen_weights(model)
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    with opt.perturbed():
        assert frozen_weights(model)["a.weight"].ne(before["a.weight"]).any()
        loss = (model["a"](torch.randn(3, 6)) + model["b"](torch.randn(3, 6))).sum()
    loss.backward()
    opt.step()
    assert_frozen_unchanged(model, before)


class _WeightInsideABiggerParameter(nn.Module):
    """A LoRA layer whose frozen weight is a slice of the model's frozen ``big`` parameter."""

    def __init__(self):
        super().__init__()
        self.big = nn.Parameter(torch.randn(10, 12), requires_grad=False)
        inner = nn.Linear(6, 4, bias=False)
        inner.weight = nn.Parameter(self.big.data[1:5, 2:8], requires_grad=False)
        self.a = LoRALinear(inner, 2, 4)


def test_a_weight_inside_another_parameter_of_the_model_is_named_in_a_warning():
    """A ``state_dict()`` taken while perturbed gives the perturbed weights' own entries clean, not the bigger tensor's."""
    model = _WeightInsideABiggerParameter()
    with pytest.warns(UserWarning, match=r"share memory with perturbed weights \(\['big'\]\)"):
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    clean = model.big.detach().clone()
    with opt.perturbed():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(inside["a.weight"], clean[1:5, 2:8])  # the weight's own entry: clean
    assert not torch.equal(inside["big"], clean)  # the bigger tensor's: as the warning says
    assert torch.equal(model.big, clean)


def test_column_blocks_of_one_large_tensor_are_told_apart_quickly():
    """Two column blocks of one 4096 x 8200 tensor: their spans cross, no element is shared. They are solved stride by
    stride, in chunks, whatever the size (an element-set comparison refused past 2^24 elements and took seconds)."""
    from flatlora_optim.shared_memory import _overlap

    big = torch.zeros(4096, 8200)
    assert not _overlap(big[:, :4100], big[:, 4100:])
    assert _overlap(big[:, :4101], big[:, 4100:])
    assert not _overlap(big.t()[:100, :50], big[:50, 100:200]) and _overlap(big.t()[:100, :50], big[:50, 99:200])
    cube = torch.zeros(4, 6, 8)
    assert not _overlap(cube[:, ::2], cube[:, 1::2]) and _overlap(cube[:, :, :5], cube[:, :, 4:])


def test_tensors_without_plain_memory_in_the_model_do_not_stop_discovery():
    """A sparse buffer, or a parameter of a wrapper subclass without storage (a quantized weight of a skipped layer),
    have no memory to compare: discovery used to raise on them."""
    model = make_mlp(seed=0)
    model.register_buffer("sparse", torch.eye(3).to_sparse())
    model.register_buffer("meta", torch.empty(3, device="meta"))
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.1, schedule="constant")
    assert len(opt.targets) == 3


def test_virtual_mode_does_not_warn_of_a_weight_inside_another_parameter():
    """Virtual mode writes nothing: the bigger tensor's state_dict entry stays clean, so there is nothing to warn of."""
    import warnings as _warnings

    model = _WeightInsideABiggerParameter()
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant", mode="virtual")
    clean = model.big.detach().clone()
    with opt.perturbed():
        assert torch.equal(model.state_dict()["big"], clean)


def test_weights_made_to_share_memory_after_construction_are_refused_at_the_next_draw():
    """The check runs again whenever a layer changed since the last step (the steady-reads test), so a weight swapped
    for another tensor over the same memory after the wrapper was built is refused before any noise goes in."""
    model = _two_layers_over(lambda big: big[:4, :6], lambda big: big[4:, 6:])
    opt = FlatLoRA(torch.optim.SGD(list(lora_parameters(model)), lr=0.1), model, rho=0.3, schedule="constant")
    with opt.perturbed():
        pass
    model["b"].weight = nn.Parameter(model["a"].weight.data, requires_grad=False)
    assert_block_refused_untouched(model, opt, ValueError, "'a' and 'b' hold base weights that share memory")
