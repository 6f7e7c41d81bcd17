"""Give your own LoRA layer Flat-LoRA with one registration call (no library patching).

Run: python examples/custom_lora_layer.py
"""

import torch
from torch import nn

from flatlora_optim import FlatLoRA, LoRALayerInfo, format_targets, register_lora_layer


class MyLoRALinear(nn.Module):
    """y = x W^T + gain * (x U) V, with U: in x r and V: r x out (not peft's orientation)."""

    def __init__(self, base: nn.Linear, r: int = 4, gain: float = 2.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.U = nn.Parameter(torch.randn(base.in_features, r) * 0.01)
        self.V = nn.Parameter(torch.zeros(r, base.out_features))
        self.gain = gain
        self.enabled = True

    def forward(self, x):
        out = self.base(x)
        return out + self.gain * (x @ self.U @ self.V) if self.enabled else out


def describe(layer: MyLoRALinear) -> LoRALayerInfo:
    # Row orientation: A is r x fan_in, B is out x r, so that the forward adds gain * B @ A to W (out x in).
    adapters = [(layer.U.t(), layer.V.t(), layer.gain)] if layer.enabled else []
    return LoRALayerInfo(weight=layer.base.weight, adapters=adapters)


register_lora_layer(MyLoRALinear, describe)


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MyLoRALinear(nn.Linear(16, 32)), nn.ReLU(), MyLoRALinear(nn.Linear(32, 4)))
    adapters = [p for name, p in model.named_parameters() if name.endswith((".U", ".V"))]
    opt = FlatLoRA(torch.optim.AdamW(adapters, lr=1e-2), model, rho=0.05, total_steps=20)
    print(format_targets(opt.targets))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    frozen = [m.base.weight.detach().clone() for m in (model[0], model[2])]
    for _ in range(20):
        opt.zero_grad()
        with opt.perturbed():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
    assert all(torch.equal(m.base.weight, w) for m, w in zip((model[0], model[2]), frozen))
    print(f"final loss {loss.item():.4f}; frozen weights restored bitwise after every step")


if __name__ == "__main__":
    main()
