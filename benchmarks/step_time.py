"""Step time and peak memory: plain LoRA vs Flat-LoRA (each mode and restore strategy) vs a paper-style loop.

Everything is measured side by side in one process on one model, with warm-up and medians:

* ``lora``            plain LoRA step (forward, backward, AdamW step)
* ``flat-exact``      Flat-LoRA, in-place, exact compact restore (the default)
* ``flat-backup``     Flat-LoRA, in-place, full-copy restore
* ``flat-host``       Flat-LoRA, in-place, restore from a copy in host memory (written back during the backward)
* ``flat-<kind>-held`` the same with the noise held by ``perturb()`` / ``restore()`` around the forward and backward
                      (the Lightning callback's pattern); ``flat-host-held`` writes back at the end
* ``flat-<kind>-released`` the noise held by ``perturb()``, the backward in ``final_backward()``: the transformers
                      Trainer integration's pattern (its last micro-batch's backward); ``flat-host-released`` writes
                      layers back during the backward
* ``flat-subtract``   Flat-LoRA, in-place, the paper's subtraction restore (drifts)
* ``flat-virtual``    Flat-LoRA, virtual mode (weights never written)
* ``reference``       a loop written from the paper's description: W' = W + sBA materialised, a full
                      std tensor, ``torch.normal`` after re-seeding the *global* RNG from the clock,
                      restore by subtracting the regenerated noise
* ``*/perturb+restore`` the perturb and restore calls alone (no forward/backward)

Configurations (``--config``):

* ``cpu``: a Llama-architecture model with random weights (hidden 128, 2 layers, MLP 344, vocab
  512), fp32, batch 4 x 64 tokens, LoRA r=8 on all seven projections, AdamW. A minute or two on 2 cores.
* ``gpu``: the issue's configuration: hidden 2048, 16 layers, MLP 5632, vocab 32000 (about 0.96 B
  parameters, 0.82 B in LoRA-wrapped linears), bf16, batch 8 x 1024 tokens, LoRA r=8 on all seven
  projections, AdamW.
* ``cpu-gpt2``: the ``cpu`` configuration's sizes as a GPT-2 (``Conv1D`` layers, transposed views; MLP 512).
* ``gpu-gpt2``: a GPT-2-architecture model of about the same size (hidden 2048, 16 layers, MLP 8192, vocab
  32000; 0.81 B parameters in LoRA-wrapped ``Conv1D`` layers, whose rows are the stored weights' columns:
  ``fan_in_fan_out``), bf16, batch 8 x 1024 tokens, LoRA r=8 on ``c_attn``, ``c_proj`` and ``c_fc``, AdamW, no
  dropout. The paper-style reference is Llama's (it takes rows as stored) and does not run here.
* ``gpu-small``: the same architecture at about 0.13 B parameters (hidden 768, 12 layers, MLP 2048, vocab
  32000; 84 LoRA-wrapped linears), bf16, batch 8 x 512 tokens. Its steps are short, so the host's work per
  step (Python, launches) weighs more against the GPU's than in ``gpu``.

Output: a table of ratios against plain LoRA, and the same numbers as JSON (``--json``). Each step is
timed alone, between two device synchronisations (the median is ``ms_per_step``); blocks of steps
are also timed back to back with no synchronisation in between (``ms_per_step_back_to_back``), as a
training loop runs them: there the host's work can overlap the device's. The JSON also
lists, per timed step, the milliseconds Python's garbage collector spent in full (generation 2)
collections during that step (``gc_full_ms``): a full collection walks the whole process heap (torch,
transformers, peft...) and shows up as one slow step that is not the method's own cost. On CUDA it also
records, after each timed step, the GPU's SM clock, temperature and power draw where torch can read them
through NVML (``gpu_state_all``: a clock that drops with the step time points at the GPU, not the host), and
with ``--gpu-busy`` the device's own time per step (``gpu_busy_ms_all``): each step is queued behind a sleep
kernel, so the host's launches are hidden and CUDA events time the GPU's work (in-place exact's one host
sync still counts: the host waits there, then launches the rest).

    python benchmarks/step_time.py --config cpu --json docs/benchmarks/cpu.json
    python benchmarks/step_time.py --config gpu --json docs/benchmarks/gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

CONFIGS = {
    "cpu": dict(hidden=128, layers=2, mlp=344, vocab=512, heads=4, batch=4, seq=64, dtype="float32", warmup=2, steps=10, pr_reps=10, back_to_back=5),
    "cpu-gpt2": dict(arch="gpt2", hidden=128, layers=2, mlp=512, vocab=512, heads=4, batch=4, seq=64, dtype="float32", warmup=2, steps=10,
                     pr_reps=10, back_to_back=5),
    "gpu": dict(hidden=2048, layers=16, mlp=5632, vocab=32000, heads=16, batch=8, seq=1024, dtype="bfloat16", warmup=5, steps=20, pr_reps=10, back_to_back=10),
    "gpu-gpt2": dict(arch="gpt2", hidden=2048, layers=16, mlp=8192, vocab=32000, heads=16, batch=8, seq=1024, dtype="bfloat16", warmup=5, steps=20,
                     pr_reps=10, back_to_back=10),
    "gpu-small": dict(hidden=768, layers=12, mlp=2048, vocab=32000, heads=12, batch=8, seq=512, dtype="bfloat16", warmup=5, steps=30, pr_reps=20,
                      back_to_back=20),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_PROJECTIONS = ["c_attn", "c_proj", "c_fc"]  # transformers' Conv1D: weights stored in x out


def config_device(cfg_name: str) -> torch.device:
    """CUDA for the ``gpu*`` configurations, else the CPU."""
    return torch.device("cuda" if cfg_name.startswith("gpu") else "cpu")


def build_model(cfg: dict, device: torch.device):
    import peft
    import transformers

    torch.manual_seed(0)
    gpt2 = cfg.get("arch") == "gpt2"
    if gpt2:
        config = transformers.GPT2Config(vocab_size=cfg["vocab"], n_positions=cfg["seq"], n_embd=cfg["hidden"], n_layer=cfg["layers"],
                                         n_head=cfg["heads"], n_inner=cfg["mlp"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0)
    else:
        config = transformers.LlamaConfig(
            vocab_size=cfg["vocab"],
            hidden_size=cfg["hidden"],
            intermediate_size=cfg["mlp"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            num_key_value_heads=cfg["heads"],
            max_position_embeddings=cfg["seq"],
        )
    dtype = getattr(torch, cfg["dtype"])
    with torch.device(device):  # initialise on the device: fast for the 1 B model
        model = (transformers.GPT2LMHeadModel if gpt2 else transformers.LlamaForCausalLM)(config).to(dtype=dtype)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=GPT2_PROJECTIONS if gpt2 else PROJECTIONS, lora_dropout=0.0, fan_in_fan_out=gpt2)
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # a trained-looking adapter, so that W + sBA != W
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


GPU_BUSY_SLEEP_CYCLES = 1_000_000_000
"""The sleep kernel ahead of each ``--gpu-busy`` step: about 0.5 s on an H200, longer than the host needs
to issue a step's launches."""


def gpu_state() -> Dict[str, Optional[float]]:
    """The GPU's SM clock (MHz), temperature (C) and power draw (W) now; None where torch cannot read
    them (NVML, through the ``pynvml`` module, is not installed)."""
    state: Dict[str, Optional[float]] = {}
    for key, read, scale in (("sm_clock_mhz", "clock_rate", 1.0), ("temperature_c", "temperature", 1.0), ("power_w", "power_draw", 1e-3)):
        try:
            state[key] = getattr(torch.cuda, read)() * scale  # power_draw is in milliwatts
        except Exception:  # no NVML here, or a driver that does not report it
            state[key] = None
    return state


def make_ids(cfg: dict, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The benchmark's batch of token ids (``batch x seq``), drawn on the CPU from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def checksum(model) -> List[int]:
    """Two integer sums of the frozen weights' bit patterns (position-weighted), to check exactness cheaply."""
    total = []
    for p in model.parameters():
        if p.requires_grad or not p.is_floating_point():
            continue
        bits = p.detach().reshape(-1).view({2: torch.int16, 4: torch.int32}[p.element_size()]).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        total.append((int(bits.sum()), int((bits * weights).sum())))
    return total


class PaperStyleReference:
    """Flat-LoRA as the paper describes it, written plainly, as users would otherwise copy it."""

    def __init__(self, model, rho: float):
        self.layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer") and "default" in m.lora_A]
        self.rho = rho
        self.seed = 0

    @torch.no_grad()
    def perturb(self) -> None:
        self.seed = int(time.time() * 1e6) % 2**31
        torch.manual_seed(self.seed)  # the global RNG, from the wall clock
        for m in self.layers:
            W = m.base_layer.weight
            full = W + m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)  # W' (m x n)
            std = (self.rho / math.sqrt(W.shape[1]) * full.norm(dim=1, keepdim=True)).expand_as(W).contiguous()  # full std tensor
            W.add_(torch.normal(0.0, std))
            m._reference_std = std.norm(dim=1, keepdim=True) / math.sqrt(W.shape[1])  # keep the row scale only

    @torch.no_grad()
    def restore(self) -> None:
        torch.manual_seed(self.seed)  # regenerate the same noise, subtract it
        for m in self.layers:
            W = m.base_layer.weight
            std = m._reference_std.expand_as(W).contiguous()
            W.sub_(torch.normal(0.0, std))


def make_step(model, ids, base, flat, reference, held: bool = False, released: bool = False,
              mark: Optional[Callable[[str], None]] = None) -> Callable[[], None]:
    """One training step of the method: Flat-LoRA wrapper, paper-style reference, or plain LoRA. ``held``: the noise
    held across the forward and backward with ``perturb()`` / ``restore()``, as the Lightning callback does;
    ``released``: the backward in ``final_backward()``, as the transformers Trainer integration runs the last
    micro-batch's backward. ``mark(phase)`` is called at the end of each phase: ``perturb``, ``forward``,
    ``backward``, ``step`` (``synced_phases.py`` records CUDA events there)."""
    mark = mark or (lambda phase: None)

    def step() -> None:
        if flat is not None and (held or released):
            flat.perturb()
            mark("perturb")
            loss = model(input_ids=ids, labels=ids).loss
            mark("forward")
            with flat.final_backward() if released else contextlib.nullcontext():
                loss.backward()
            flat.restore()
            mark("backward")
            flat.step()
            flat.zero_grad()
            mark("step")
            return
        if flat is not None:
            with flat.perturbed():
                mark("perturb")
                loss = model(input_ids=ids, labels=ids).loss
            mark("forward")
            loss.backward()
            mark("backward")
            flat.step()
            flat.zero_grad()
            mark("step")
            return
        if reference is not None:
            reference.perturb()
        mark("perturb")
        loss = model(input_ids=ids, labels=ids).loss
        mark("forward")
        loss.backward()
        if reference is not None:
            reference.restore()
        mark("backward")
        base.step()
        base.zero_grad()
        mark("step")

    return step


def make_method(method: str, model, lora_params) -> Tuple[torch.optim.Optimizer, Optional[object], Optional[PaperStyleReference]]:
    """``(AdamW, FlatLoRA or None, reference loop or None)`` for one of the methods listed above."""
    from flatlora_optim import FlatLoRA

    base = torch.optim.AdamW(lora_params, lr=1e-5)
    if method.startswith("flat-"):
        kind = method.split("-", 1)[1].removesuffix("-held").removesuffix("-released")
        mode = "virtual" if kind == "virtual" else "inplace"
        restore = "exact" if kind == "virtual" else kind
        return base, FlatLoRA(base, model, rho=0.05, schedule="constant", seed=0, mode=mode, restore=restore), None
    if method == "reference":
        return base, None, PaperStyleReference(model, rho=0.05)
    if method != "lora":
        raise ValueError(f"unknown method {method!r}")
    return base, None, None


def make_perturb_restore(method) -> Callable[[], None]:
    def perturb_restore() -> None:
        method.perturb()
        method.restore()

    return perturb_restore


def make_virtual_forming(flat) -> Callable[[], None]:
    """What virtual mode adds per step: the row stds, then W + e formed for every layer twice (forward, backward)."""

    def form() -> None:
        with flat.perturbed():
            for p in flat._perturbations or []:
                flat._perturber.perturbed_rows(p)
                flat._perturber.perturbed_rows(p)

    return form


class FullCollections:
    """Milliseconds spent in full (generation 2) garbage collections since the last ``take()``."""

    def __init__(self) -> None:
        self.ms = 0.0
        self._start = 0.0
        gc.callbacks.append(self._event)

    def _event(self, phase: str, info: Dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1000

    def take(self) -> float:
        ms, self.ms = self.ms, 0.0
        return ms

    def close(self) -> None:
        gc.callbacks.remove(self._event)


def _transposed_tiles() -> bool:
    """Whether the exact codec's transposed tiles were on (``FLATLORA_TRANSPOSED_TILES``; GPT-2's layers take them)."""
    from flatlora_optim.kernels import layer_table

    return layer_table.TRANSPOSED_TILES


def run(cfg_name: str, methods: List[str], threads: int = 2, gpu_busy: bool = False) -> Dict:
    cfg = CONFIGS[cfg_name]
    if cfg.get("arch") == "gpt2" and "reference" in methods:
        raise SystemExit(f"--config {cfg_name}: the paper-style reference takes a weight's rows as stored, which GPT-2's Conv1D "
                         "weights are not; leave 'reference' out of --methods")
    device = config_device(cfg_name)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    model = build_model(cfg, device)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    wrapped = [m.base_layer.weight for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    perturbed_params = sum(w.numel() for w in wrapped)
    perturbed_bytes = sum(w.numel() * w.element_size() for w in wrapped)
    ids = make_ids(cfg, device)
    clean = checksum(model)
    results: Dict[str, Dict] = {}
    collections = FullCollections()
    gc_ms: List[float] = []
    states: List[Dict[str, Optional[float]]] = []

    def time_steps(step: Callable[[], None], n_warm: int, n: int) -> List[float]:
        for _ in range(n_warm):
            step()
        sync(device)
        times = []
        gc_ms.clear()
        states.clear()
        for _ in range(n):
            sync(device)
            collections.take()
            start = time.perf_counter()
            step()
            sync(device)
            times.append((time.perf_counter() - start) * 1000)
            gc_ms.append(round(collections.take(), 3))
            if device.type == "cuda":
                states.append(gpu_state())
        return times

    def time_gpu_busy(step: Callable[[], None], n: int) -> List[float]:
        """GPU milliseconds of each of ``n`` steps, the host's launches hidden behind a sleep kernel."""
        out = []
        for _ in range(n):
            sync(device)
            torch.cuda._sleep(GPU_BUSY_SLEEP_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            sync(device)
            out.append(start.elapsed_time(end))
        return out

    def time_back_to_back(step: Callable[[], None], n: int, blocks: int = 3) -> List[float]:
        """ms per step over ``n`` steps run with no synchronisation between them (the host may run
        ahead of the device, as in a training loop), one value per block of ``n`` steps."""
        per_step = []
        for _ in range(blocks):
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            sync(device)
            per_step.append((time.perf_counter() - start) * 1000 / n)
        return per_step

    for method in methods:
        base, flat, reference = make_method(method, model, lora_params)
        step = make_step(model, ids, base, flat, reference, held=method.endswith("-held"), released=method.endswith("-released"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(step, cfg["warmup"], cfg["steps"])
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        back_to_back = time_back_to_back(step, cfg["back_to_back"])
        entry = {"ms_per_step": statistics.median(times), "ms_all": times, "gc_full_ms": list(gc_ms), "peak_bytes": peak,
                 "ms_per_step_back_to_back": statistics.median(back_to_back), "ms_back_to_back_blocks": back_to_back}
        if device.type == "cuda":
            entry["gpu_state_all"] = list(states)
            if gpu_busy:
                entry["gpu_busy_ms_all"] = time_gpu_busy(step, cfg["steps"])
        if flat is not None and flat.mode == "virtual":
            pr = time_steps(make_virtual_forming(flat), 2, cfg["pr_reps"])
            entry["form_noisy_weights_ms"] = statistics.median(pr)
        if flat is not None and flat.mode == "inplace":
            pr = time_steps(make_perturb_restore(flat), 2, cfg["pr_reps"])
            entry["perturb_restore_ms"] = statistics.median(pr)
            entry["restore_bytes"] = flat.peak_restore_bytes
        if reference is not None:
            pr = time_steps(make_perturb_restore(reference), 2, cfg["pr_reps"])
            entry["perturb_restore_ms"] = statistics.median(pr)
        entry["weights_bitwise_equal"] = checksum(model) == clean
        results[method] = entry
        # the drifting methods (flat-subtract, reference) come last: they change the weights for good
        extra = f"  perturb+restore {entry['perturb_restore_ms']:.2f} ms" if "perturb_restore_ms" in entry else ""
        extra += f"  stds + W+e formed twice {entry['form_noisy_weights_ms']:.2f} ms" if "form_noisy_weights_ms" in entry else ""
        extra += f"  GPU busy {statistics.median(entry['gpu_busy_ms_all']):.2f} ms" if "gpu_busy_ms_all" in entry else ""
        print(f"{method:<14} {entry['ms_per_step']:9.2f} ms/step{extra}", flush=True)

    plain = results["lora"]
    summary = {
        "config": cfg_name,
        "settings": cfg,
        "perturbed_params": perturbed_params,
        "perturbed_bytes": perturbed_bytes,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "transposed_tiles": _transposed_tiles(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
        "ratios": {m: r["ms_per_step"] / plain["ms_per_step"] for m, r in results.items()},
        "ratios_back_to_back": {m: r["ms_per_step_back_to_back"] / plain["ms_per_step_back_to_back"] for m, r in results.items()},
    }
    if plain["peak_bytes"]:
        summary["extra_peak_fraction_of_perturbed"] = {m: (r["peak_bytes"] - plain["peak_bytes"]) / perturbed_bytes for m, r in results.items()}
    collections.close()
    return summary


def print_table(summary: Dict) -> None:
    print(f"\n{summary['config']} on {summary['device']} (torch {summary['torch']}), {summary['perturbed_params'] / 1e6:.1f} M perturbed parameters")
    print(f"{'method':<14} | {'ms/step':>9} | {'x LoRA':>7} | {'x LoRA, back to back':>20} | "
          f"{'perturb+restore ms':>18} | {'extra peak / perturbed bytes':>28} | exact")
    for method, r in summary["results"].items():
        pr = f"{r['perturb_restore_ms']:.2f}" if "perturb_restore_ms" in r else "-"
        if "form_noisy_weights_ms" in r:
            pr = f"({r['form_noisy_weights_ms']:.2f})"
        extra = summary.get("extra_peak_fraction_of_perturbed", {}).get(method)
        extra_s = f"{extra:+.2%}" if extra is not None else "n/a (CPU)"
        back = summary["ratios_back_to_back"][method]
        print(f"{method:<14} | {r['ms_per_step']:9.2f} | {summary['ratios'][method]:7.3f} | {back:20.3f} | "
              f"{pr:>18} | {extra_s:>28} | {r['weights_bitwise_equal']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--methods", default="lora,flat-exact,flat-backup,flat-host,flat-virtual,flat-subtract,reference")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (use 1 on a machine shared with other jobs)")
    parser.add_argument("--gpu-busy", action="store_true",
                        help="CUDA: also time each step's GPU work with the host's launches hidden (about 0.5 s more per step)")
    args = parser.parse_args()
    summary = run(args.config, args.methods.split(","), args.threads, gpu_busy=args.gpu_busy)
    summary["threads"] = args.threads
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
