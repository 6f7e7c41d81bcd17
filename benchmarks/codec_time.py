"""Time the fused exact codec alone (perturb pass, restore pass) on 24 bf16 5632 x 2048 weights, and check it.

    python benchmarks/codec_time.py        # CUDA with Triton only
"""
import torch, time
from flatlora_optim.kernels.triton_noise import TritonNoiseKernel
from flatlora_optim.kernels.layer_table import LayerTable
k = TritonNoiseKernel()
g = torch.Generator(device="cuda").manual_seed(0)
ws = [(torch.randn(5632, 2048, device="cuda", generator=g)*0.02).to(torch.bfloat16) for _ in range(24)]
before = [w.clone() for w in ws]
table = LayerTable(ws)
std = torch.full((table.total_rows,), 0.001, device="cuda")
seeds = torch.arange(table.total_blocks, dtype=torch.int64, device="cuda") * 7919 + 3
def t(fn):
    torch.cuda.synchronize(); s=time.perf_counter(); r=fn(); torch.cuda.synchronize(); return (time.perf_counter()-s)*1e3, r
for i in range(3):
    tp, rec = t(lambda: k.exact_perturb_layers(table, std, seeds))
    tr, _ = t(lambda: k.exact_restore_layers(table, std, seeds, rec))
    bad = sum(int((w.view(torch.int16) != b.view(torch.int16)).sum()) for w, b in zip(ws, before))
    print(f"perturb {tp:.2f} ms restore {tr:.2f} ms elements {sum(w.numel() for w in ws)/1e6:.0f}M  wrong after restore {bad} caps {rec.amb_capacity} {rec.exc_capacity} n_exc {rec.n_exceptions} skipped {(rec.bounds<0).sum().item()}")
    for w, b in zip(ws, before): w.copy_(b)
