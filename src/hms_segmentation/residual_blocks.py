"""Residual blocks shared by the HRNet and ResNet trunks (ResNet v1.5 layout: any stride sits on the 3x3 conv), and
the gradient-checkpointing base of every trunk block."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


@contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """
    Inside the block, every normalisation layer of `module` that tracks running statistics (`running_mean`,
    `running_var`, `num_batches_tracked`) updates copies of them; the originals come back untouched on exit. Copies
    rather than a restore afterwards: autograd saves the statistics a BatchNorm used and refuses a backward through
    them once they are modified in place.
    """
    originals = []
    for norm in module.modules():
        if getattr(norm, "track_running_stats", False):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(norm, name, None)
                if buffer is not None:
                    originals.append((norm, name, buffer))
                    setattr(norm, name, buffer.clone())
    try:
        yield
    finally:
        for norm, name, buffer in originals:
            setattr(norm, name, buffer)


def normalises_across_processes(norm: nn.Module) -> bool:
    """Whether `norm` is a SyncBatchNorm in a run of several processes: its batch statistics then span them all."""
    if not isinstance(norm, nn.SyncBatchNorm):
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size(norm.process_group or torch.distributed.group.WORLD) > 1


class HMSCheckpointedBlock(GradientCheckpointingLayer):
    """
    A trunk block that `model.gradient_checkpointing_enable()` recomputes in the backward pass instead of keeping its
    activations. The recomputation runs the block's BatchNorm layers in training mode a second time, which would
    update their running statistics twice per step (the momentum applied twice, `num_batches_tracked` counted twice,
    so the statistics used at evaluation drift from those of a plain run); the recomputation updates throw-away
    copies instead (`running_statistics_kept`), so a checkpointed step leaves the same statistics as a plain one.
    The first call of the checkpointed function is the forward pass, every later one a recomputation.
    """

    @property
    def _gradient_checkpointing_func(self) -> Callable[..., Any]:
        checkpoint_function = self.__dict__.get("_checkpoint_function")
        if checkpoint_function is None:
            raise AttributeError("gradient checkpointing was never enabled on this block")

        def checkpoint_keeping_statistics(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            calls = 0

            def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == 1:  # the forward pass itself
                    return function(*inner_args, **inner_kwargs)
                with running_statistics_kept(self):  # a recomputation in the backward pass
                    return function(*inner_args, **inner_kwargs)

            return checkpoint_function(run, *args, **kwargs)

        return checkpoint_keeping_statistics

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, checkpoint_function: Callable[..., Any]) -> None:
        self.__dict__["_checkpoint_function"] = checkpoint_function


class HMSBasicBlock(HMSCheckpointedBlock):
    """Two 3x3 convolutions with a residual connection. Keeps the channel count (`expansion = 1`)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, eps: float, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, eps=eps)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=eps)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.downsample is None else self.downsample(hidden_states)
        out = self.relu(self.bn1(self.conv1(hidden_states)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class HMSBottleneck(HMSCheckpointedBlock):
    """1x1 -> 3x3 -> 1x1 bottleneck with a residual connection; outputs `4 * channels` (`expansion = 4`)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        eps: float,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, eps=eps)
        self.conv2 = nn.Conv2d(
            channels, channels, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(channels, eps=eps)
        self.conv3 = nn.Conv2d(channels, channels * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion, eps=eps)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.downsample is None else self.downsample(hidden_states)
        out = self.relu(self.bn1(self.conv1(hidden_states)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


RESIDUAL_BLOCKS: dict[str, type[HMSBasicBlock] | type[HMSBottleneck]] = {
    "basic": HMSBasicBlock,
    "bottleneck": HMSBottleneck,
}


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, eps: float, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels, eps=eps),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_residual_layer(
    block: str, in_channels: int, channels: int, num_blocks: int, eps: float, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """
    A chain of `num_blocks` residual blocks. The first one carries the stride and projects its input (1x1 conv + BN,
    named `downsample`) when the stride or the channel count changes; `dilation` applies to every block.
    """
    block_class = RESIDUAL_BLOCKS[block]
    out_channels = channels * block_class.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = conv_bn(in_channels, out_channels, kernel_size=1, stride=stride, eps=eps, relu=False)
    extra = {"dilation": dilation} if dilation != 1 else {}
    layers = [block_class(in_channels, channels, eps, stride=stride, downsample=downsample, **extra)]
    layers += [block_class(out_channels, channels, eps, **extra) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)
