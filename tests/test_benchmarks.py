"""The step-time benchmark runs end to end (a tiny CPU configuration) and reports what docs/benchmarks.md reads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_step_time_benchmark_runs_every_method_side_by_side(monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import step_time

    tiny = dict(hidden=32, layers=1, mlp=64, vocab=64, heads=2, batch=2, seq=8, dtype="float32", warmup=1, steps=3, pr_reps=2, back_to_back=2)
    monkeypatch.setitem(step_time.CONFIGS, "cpu", tiny)
    methods = ["lora", "flat-exact", "flat-backup", "flat-host", "flat-virtual", "flat-subtract", "reference"]
    summary = step_time.run("cpu", methods, threads=1)

    assert list(summary["results"]) == methods
    assert summary["perturbed_params"] == 4 * 32 * 32 + 3 * 32 * 64  # q k v o: 32 x 32; gate, up: 64 x 32; down: 32 x 64
    for method, result in summary["results"].items():
        assert len(result["ms_all"]) == len(result["gc_full_ms"]) == tiny["steps"], method
        assert result["ms_per_step"] > 0 and all(ms >= 0 for ms in result["gc_full_ms"])
        assert summary["ratios"][method] == pytest.approx(result["ms_per_step"] / summary["results"]["lora"]["ms_per_step"])
        assert len(result["ms_back_to_back_blocks"]) == 3 and result["ms_per_step_back_to_back"] > 0
        assert summary["ratios_back_to_back"][method] == pytest.approx(
            result["ms_per_step_back_to_back"] / summary["results"]["lora"]["ms_per_step_back_to_back"])
    for method in ("lora", "flat-exact", "flat-backup", "flat-host", "flat-virtual"):  # the exact methods leave the weights as they were
        assert summary["results"][method]["weights_bitwise_equal"], method
    assert not summary["results"]["reference"]["weights_bitwise_equal"]  # subtraction drifts: the benchmark must see it
    assert "perturb_restore_ms" in summary["results"]["flat-exact"] and "form_noisy_weights_ms" in summary["results"]["flat-virtual"]
    assert not any("gpu_state_all" in r or "gpu_busy_ms_all" in r for r in summary["results"].values())  # CUDA only


def test_step_time_gpt2_configuration_perturbs_the_conv1d_layers_as_transposed_views(monkeypatch):
    """``--config cpu-gpt2`` / ``gpu-gpt2``: a GPT-2 whose LoRA layers (``c_attn``, both ``c_proj``, ``c_fc``) are
    peft ``Conv1D`` layers, found as transposed views; every method restores bitwise; the paper-style reference,
    which takes rows as stored, is refused with a message that says to leave it out."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import step_time

    tiny = dict(step_time.CONFIGS["cpu-gpt2"], hidden=32, layers=1, mlp=64, vocab=64, heads=2, batch=2, seq=8, warmup=1, steps=2, pr_reps=2,
                back_to_back=2)
    assert step_time.CONFIGS["gpu-gpt2"]["arch"] == "gpt2"
    monkeypatch.setitem(step_time.CONFIGS, "cpu-gpt2", tiny)
    with pytest.raises(SystemExit, match="leave 'reference' out"):
        step_time.run("cpu-gpt2", ["lora", "reference"], threads=1)
    summary = step_time.run("cpu-gpt2", ["lora", "flat-exact", "flat-virtual"], threads=1)
    assert summary["perturbed_params"] == 32 * 96 + 32 * 32 + 32 * 64 + 64 * 32  # c_attn, attn c_proj, c_fc, mlp c_proj
    assert all(r["weights_bitwise_equal"] for r in summary["results"].values())
    model = step_time.build_model(tiny, torch.device("cpu"))
    _, flat, _ = step_time.make_method("flat-exact", model, [p for p in model.parameters() if p.requires_grad])
    assert [d["view"] for d in flat.describe()] == ["transposed"] * 4


@pytest.mark.parametrize("method", ["lora", "reference", "flat-exact", "flat-exact-held", "flat-host-released"])
def test_step_time_steps_mark_their_phases_in_order(method):
    """synced_phases.py times step_time's own steps through their ``mark`` calls: every method marks the four phases,
    once each and in order, and the step still trains (the frozen weights come back bitwise for the exact methods)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import step_time

    cfg = dict(step_time.CONFIGS["cpu"], layers=1, hidden=32, mlp=64, vocab=64, heads=4, seq=8, batch=2)
    model = step_time.build_model(cfg, torch.device("cpu"))
    base, flat, reference = step_time.make_method(method, model, [p for p in model.parameters() if p.requires_grad])
    marks = []
    step = step_time.make_step(model, step_time.make_ids(cfg, torch.device("cpu")), base, flat, reference,
                               held=method.endswith("-held"), released=method.endswith("-released"), mark=marks.append)
    clean = step_time.checksum(model)
    for _ in range(2):
        marks.clear()
        step()
        assert marks == ["perturb", "forward", "backward", "step"]
    assert (step_time.checksum(model) == clean) == (method != "reference")  # the paper-style loop drifts


def test_gpu_state_reads_what_torch_can_and_none_for_the_rest(monkeypatch):
    import step_time

    monkeypatch.setattr(torch.cuda, "clock_rate", lambda: 1980, raising=False)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda: 450_000, raising=False)

    def no_nvml():
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "temperature", no_nvml, raising=False)
    assert step_time.gpu_state() == {"sm_clock_mhz": 1980.0, "temperature_c": None, "power_w": 450.0}


def test_fsdp_benchmark_runs_on_two_cpu_ranks_and_checks_every_rank(monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    import fsdp_step_time

    tiny = dict(hidden=32, layers=2, mlp=64, vocab=64, heads=2, batch=2, seq=8, dtype="float32", warmup=1, steps=2, pr_reps=1, back_to_back=2)
    monkeypatch.setitem(fsdp_step_time.CONFIGS, "cpu", tiny)  # run() hands the settings to the spawned ranks
    summary = fsdp_step_time.run("cpu", ["lora", "flat-exact"], nproc=2)

    assert summary["world_size"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert summary["weights_bitwise_equal_every_rank"]
    for rank in summary["ranks"]:
        assert rank["perturbed_bytes"] == (4 * 32 * 32 + 3 * 32 * 64) * 2 * 4 // 2  # 2 layers, float32, half the rows each
        assert len(rank["results"]["flat-exact"]["ms_all"]) == tiny["steps"]
    slowest = summary["ms_per_step_slowest_rank"]
    assert slowest["flat-exact"] == max(r["results"]["flat-exact"]["ms_per_step"] for r in summary["ranks"])
    assert summary["ratios"]["flat-exact"] == pytest.approx(slowest["flat-exact"] / slowest["lora"])


def test_host_time_benchmark_takes_the_step_wide_path_with_the_stub_kernel():
    """The host-time benchmark must time the CUDA step-wide path (one grouped slot per layer), not the
    CPU path, while launching nothing; and leave the real kernel selection in place afterwards."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import host_time

    import flatlora_optim.noise as noise
    import flatlora_optim.perturbation as perturbation
    from flatlora_optim import FlatLoRA

    model = host_time.build_model(layers=2)
    with host_time.stub_kernel():
        opt = FlatLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), model, rho=0.05, schedule="constant")
        opt.perturb()
        assert all(p.blocks[0][0] == perturbation._GROUPED for p in opt._perturbations)
        opt.restore()
    assert noise.kernel_for(torch.device("cpu")).name == "torch"
    summary = host_time.run(reps=3, layers=2)
    assert set(summary["results"]) == {"exact", "backup", "virtual"}
    for result in summary["results"].values():
        assert result["layers"] == 14 and result["perturb_ms"] > 0 and result["restore_ms"] > 0


def test_every_codec_ablation_variant_still_applies_to_the_kernel_source(tmp_path):
    """Each variant of ``codec_ablation.py`` is an edit of the kernel's source: an edit whose text is no
    longer in the source would make the benchmark fail on the GPU, where it is run by hand."""
    pytest.importorskip("triton")
    import codec_ablation

    for name, (edits, _, _) in codec_ablation.VARIANTS.items():
        module = codec_ablation.load_variant(name, edits, tmp_path)
        assert hasattr(module, "TritonNoiseKernel"), name


def test_gpu_idle_splits_a_steps_idle_time_into_start_our_kernels_and_the_rest():
    from gpu_idle import GAP_US, split_idle

    # two steps, each opened by the marker (the sleep kernel "spin_kernel"); times in microseconds
    timeline = [
        (0, 10, "void at::cuda::spin_kernel"), (110, 200, "gemm"), (250, 300, "_noise_kernel_0d1d"), (305, 400, "gemm"),
        (390, 500, "overlapping copy"),
        (1000, 1010, "void at::cuda::spin_kernel"), (1020, 1100, "gemm"), (1100 + GAP_US + 1, 1200, "_row_std_kernel"),
    ]
    first, second = split_idle(timeline)
    assert first["idle_parts_ms"] == {"start": 0.1, "next to _noise_kernel": 0.05, "other": 0.005}
    assert abs(first["busy_ms"] - 0.335) < 1e-9 and abs(first["span_ms"] - 0.49) < 1e-9  # 90 + 50 + 95 + 100: the overlap counted once
    assert abs(first["idle_ms"] - sum(first["idle_parts_ms"].values())) < 1e-9
    assert second["idle_parts_ms"] == {"start": 0.01, "next to _row_std_kernel": round((GAP_US + 1) / 1e3, 3)}


def test_perturb_host_sections_times_the_step_wide_path_with_the_stub_kernel():
    """The sections benchmark must see the CUDA path's entry points in the order a step reaches them (the launch of
    the noise pass after the row stds), and leave the library's functions unwrapped afterwards."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import perturb_host_sections

    import flatlora_optim.perturbation as perturbation

    describe = perturbation.Perturber.__dict__["_describe_all"]
    for cold in (True, False):
        result = perturb_host_sections.run("flat-exact", reps=3, stub=True, cold=cold)
        first = {s["entry"]: s["first_at_ms"] for s in result["sections"]}
        calls = {s["entry"]: s["calls"] for s in result["sections"]}
        assert calls["SteadyReads.unchanged"] == calls["StepGroup.__init__"] == 1
        # cold: every layer read and checked, as after a change; warm: none of them, the last step's reads kept
        assert calls.get("Target.check", 0) == calls.get("Perturber._fusable", 0) == (112 if cold else 0)
        assert first["SteadyReads.unchanged"] < first["Kernel.row_stds"] < first["Kernel.exact_perturb_layers"] < first["FlatLoRA._restore_now"]
        assert 0 < result["host_ms"] <= result["synced_ms"]
    assert perturbation.Perturber.__dict__["_describe_all"] is describe


def test_lightning_benchmark_times_every_method_under_a_real_trainer(monkeypatch):
    """benchmarks/lightning_step_time.py on a tiny CPU model: a block time for every method, round and block; the
    frozen weights bitwise unchanged after each fit."""
    pytest.importorskip("lightning")
    import lightning_step_time
    import step_time

    tiny = dict(step_time.CONFIGS["cpu"], hidden=32, layers=1, mlp=64, vocab=64, heads=2, batch=2, seq=8)
    monkeypatch.setitem(step_time.CONFIGS, "cpu", tiny)
    summary = lightning_step_time.run("cpu", ["lora", "flat-exact", "flat-host", "flat-virtual"], rounds=2, warmup=1, steps=2, blocks=2, threads=1)
    assert list(summary["results"]) == ["lora", "flat-exact", "flat-host", "flat-virtual"]
    for method, result in summary["results"].items():
        assert len(result["ms_blocks"]) == 4 and all(ms > 0 for ms in result["ms_blocks"]), method
        assert result["weights_bitwise_equal"], method
    assert summary["ratios"]["lora"] == 1.0

