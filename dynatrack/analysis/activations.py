"""The ReLU-family activation modules, declared once for the recorder and the analyzers.

The pattern of a neuron is the sign of the module's *input* (the pre-activation):
exact for the piecewise-linear units, the gate sign for the smooth ones.

>>> import torch.nn as nn
>>> isinstance(nn.LeakyReLU(), RELU_FAMILY)
True
"""

from __future__ import annotations

from torch import nn

RELU_FAMILY: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.RReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus,
)  # fmt: skip
