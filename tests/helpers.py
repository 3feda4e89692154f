"""Shared builders for the tests: inputs in every layout, and a few training steps through a layer."""

from __future__ import annotations

import torch


def make_input(shape, layout="contiguous", dtype=torch.float32, seed=0, scale=2.0, offset=0.5):
    """A random (N, C, *) tensor in the given memory layout: contiguous, channels_last or non_contiguous."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "non_contiguous":
        # Every other channel of a twice-as-wide tensor: a strided view no kernel can treat as dense.
        wide = torch.randn(shape[0], shape[1] * 2, *shape[2:], generator=gen, dtype=torch.float64)
        x = (wide * scale + offset).to(dtype)[:, ::2]
        assert not x.is_contiguous()
        return x
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def train_steps(layer, inputs, grads):
    """Run training steps; return outputs and the input/weight/bias gradients of every step."""
    outs, grad_list = [], []
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    for x, dy in zip(inputs, grads, strict=True):
        x = x.detach().clone().requires_grad_(True)
        y = layer(x)
        y.backward(dy)
        outs.append(y.detach())
        grad_list.append([x.grad] + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    return outs, grad_list


class NoHostReads:
    """Within it, any read of a tensor's value on the host (bool, int, float, item) raises: what a GPU
    step would wait for. (`tolist` stays allowed: the late report's flags arrive that way.)"""

    def __enter__(self):
        def refuse(tensor, *args):
            raise AssertionError("a tensor was read on the host")

        self.saved = {name: getattr(torch.Tensor, name) for name in ("__bool__", "__int__", "__float__", "item")}
        for name in self.saved:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
