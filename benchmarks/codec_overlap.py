"""Does the exact codec's GPU work hide behind a training step's forward and backward on a side stream?

A bound on what a pipelined in-place design (perturb each layer just before its forward, restore it
right after its backward, on a second CUDA stream) could gain: the 1 B Llama step of ``step_time.py``
(``--config gpu``) runs as plain LoRA, while the fused codec perturbs and restores an independent copy of
its 112 LoRA-wrapped weights (nothing waits on it, so the overlap is the best any such design could
have). Variants, back to back (blocks of 10 steps, two rounds of three blocks each, median):

* ``plain``: the step alone;
* ``serial codec``: the perturb pass before the forward and the restore pass after the backward, on the
  step's own stream (what in-place exact does);
* ``restore beside backward``: the restore pass launched on a side stream when the backward starts;
* ``perturb beside fwd + restore beside bwd``: the perturb pass on the side stream too, beside the forward.

Each side-stream variant runs with a side stream of default and of high priority. The added milliseconds
against ``plain`` say how much of the codec's time the side stream hides.

    PYTHONPATH=. python3 benchmarks/codec_overlap.py        # CUDA + Triton; about two minutes on an H200
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import CONFIGS, build_model, make_ids  # noqa: E402

from flatlora_optim.kernels.layer_table import LayerTable  # noqa: E402
from flatlora_optim.kernels.triton_noise import ExactGroupRecord, TritonNoiseKernel  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    cfg = CONFIGS["gpu"]
    model = build_model(cfg, dev)
    ids = make_ids(cfg, dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    wrapped = [m.base_layer.weight for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    copies = [w.detach().clone() for w in wrapped]  # the codec's own weights: nothing in the step depends on them
    table = LayerTable(copies)
    std = torch.cat([c.float().pow(2).mean(1).sqrt() * 0.05 for c in copies])  # rho 0.05 against each row's rms
    seeds = torch.randint(0, 2**62, (sum(table.blocks),), dtype=torch.int64, device=dev)
    kernel = TritonNoiseKernel()
    kernel.exact_restore_layers(table, std, seeds, kernel.exact_perturb_layers(table, std, seeds))  # sizes the buffers
    capacity = table.codec_capacity
    before = [c.clone() for c in copies]
    main_stream = torch.cuda.current_stream()

    def perturb_pass() -> ExactGroupRecord:
        record = ExactGroupRecord.allocate(table, capacity)
        kernel._exact(table, std, seeds, record, restore=False, counters=torch.zeros(2, dtype=torch.int64, device=dev))
        record.n_exceptions = record.exc_capacity  # unused slots hold layer -1
        return record

    def restore_pass(record: ExactGroupRecord) -> None:
        kernel.exact_restore_layers(table, std, seeds, record)

    def forward() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def finish() -> None:
        opt.step()
        opt.zero_grad()

    def plain() -> None:
        forward().backward()
        finish()

    def serial() -> None:
        record = perturb_pass()
        loss = forward()
        loss.backward()
        restore_pass(record)
        finish()

    def beside(side: torch.cuda.Stream, perturb_beside: bool) -> Callable[[], None]:
        def step() -> None:
            if perturb_beside:
                side.wait_stream(main_stream)
                with torch.cuda.stream(side):
                    record = perturb_pass()
            else:
                record = perturb_pass()
            loss = forward()

            def restore_beside_backward(grad: torch.Tensor) -> torch.Tensor:  # runs as the backward starts
                side.wait_stream(main_stream)
                with torch.cuda.stream(side):
                    restore_pass(record)
                return grad

            loss.register_hook(restore_beside_backward)
            loss.backward()
            main_stream.wait_stream(side)
            finish()

        return step

    low, high = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)
    variants: Dict[str, Callable[[], None]] = {
        "plain": plain,
        "serial codec": serial,
        "restore beside backward (default priority)": beside(low, False),
        "restore beside backward (high priority)": beside(high, False),
        "perturb beside fwd + restore beside bwd (default)": beside(low, True),
        "perturb beside fwd + restore beside bwd (high)": beside(high, True),
    }

    def back_to_back(step: Callable[[], None], n: int = 10, blocks: int = 3) -> List[float]:
        out = []
        for _ in range(blocks):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(n):
                step()
            torch.cuda.synchronize()
            out.append((time.perf_counter() - start) * 1000 / n)
        return out

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    restore_pass(perturb_pass())
    end.record()
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; codec perturb + restore alone: {start.elapsed_time(end):.2f} ms")
    for step in variants.values():
        for _ in range(3):
            step()
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(2):
        for name, step in variants.items():
            times[name] += back_to_back(step)
    base = statistics.median(times["plain"])
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:50s} {ms:8.2f} ms  x{ms / base:.4f}  (+{ms - base:.2f} ms)  blocks {[round(v, 2) for v in values]}")
    exact = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(copies, before))
    print("codec's weights bitwise equal after the run:", exact)


if __name__ == "__main__":
    main()
