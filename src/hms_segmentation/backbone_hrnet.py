"""HRNetV2 trunk (Wang et al. 2019), as used by HMSA's record-setting HRNet-OCR model.

Module names follow HRNet's own vocabulary (`layer1`, `transition1`, `stage2`, `branches`, `fuse_layers`), which the
HRNet authors, NVIDIA's reference and timm share, so ImageNet-pretrained HRNet files load without renaming.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .residual_blocks import RESIDUAL_BLOCKS as HRNET_BLOCKS
from .residual_blocks import conv_bn, make_residual_layer, normalises_across_processes


class HMSHRNetModule(nn.Module):
    """
    One high-resolution module: parallel branches of residual blocks, then every branch receives the sum of all
    branches brought to its resolution (strided 3x3 convolutions downwards, 1x1 convolution + bilinear resize upwards).
    """

    def __init__(self, in_channels: list[int], stage: dict[str, Any], eps: float, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        block_class = HRNET_BLOCKS[stage["block"]]
        self.branches = nn.ModuleList(
            make_residual_layer(stage["block"], in_channels[i], stage["num_channels"][i], stage["num_blocks"][i], eps)
            for i in range(len(in_channels))
        )
        self.out_channels = [channels * block_class.expansion for channels in stage["num_channels"]]
        num_branches = len(self.out_channels)
        self.fuse_layers = nn.ModuleList()
        if num_branches == 1:
            return
        for target in range(num_branches):
            row = nn.ModuleList()
            for source in range(num_branches):
                if source > target:
                    row.append(conv_bn(self.out_channels[source], self.out_channels[target], 1, 1, eps, relu=False))
                elif source == target:
                    row.append(nn.Identity())
                else:
                    steps = target - source
                    downsampling = [
                        conv_bn(self.out_channels[source], self.out_channels[source], 3, 2, eps, relu=True)
                        for _ in range(steps - 1)
                    ]
                    downsampling.append(conv_bn(self.out_channels[source], self.out_channels[target], 3, 2, eps, relu=False))
                    row.append(nn.Sequential(*downsampling))
            self.fuse_layers.append(row)

    def forward(self, branch_states: list[torch.Tensor]) -> list[torch.Tensor]:
        branch_states = [branch(state) for branch, state in zip(self.branches, branch_states)]
        if len(self.fuse_layers) == 0:
            return branch_states
        fused = []
        for target, row in enumerate(self.fuse_layers):
            height, width = branch_states[target].shape[-2:]
            total = branch_states[0] if target == 0 else row[0](branch_states[0])
            for source in range(1, len(branch_states)):
                if source == target:
                    total = total + branch_states[source]
                elif source > target:
                    upsampled = F.interpolate(
                        row[source](branch_states[source]), size=(height, width), mode="bilinear",
                        align_corners=self.align_corners,
                    )
                    total = total + upsampled
                else:
                    total = total + row[source](branch_states[source])
            fused.append(F.relu(total))
        return fused


class HMSHRNetBackbone(nn.Module):
    """
    HRNetV2: a stride-4 stem, a bottleneck stage, then three stages that add one lower-resolution branch each and
    exchange information between branches. The output concatenates all branches at the stride-4 resolution.

    Input `pixel_values`: (batch, 3, height, width). Output: (batch, sum of stage-4 widths, ceil(height / 4),
    ceil(width / 4)), e.g. 720 channels for W48.
    """

    def __init__(self, stages: list[dict[str, Any]], stem_channels: int, eps: float, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels, eps=eps)
        self.conv2 = nn.Conv2d(stem_channels, stem_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_channels, eps=eps)
        self.relu = nn.ReLU()

        first = stages[0]
        self.layer1 = make_residual_layer(first["block"], stem_channels, first["num_channels"][0], first["num_blocks"][0], eps)
        channels = [first["num_channels"][0] * HRNET_BLOCKS[first["block"]].expansion]

        # transition1/stage2, transition2/stage3, transition3/stage4, named as in HRNet
        for index, stage in enumerate(stages[1:], start=2):
            expansion = HRNET_BLOCKS[stage["block"]].expansion
            wanted = [c * expansion for c in stage["num_channels"]]
            setattr(self, f"transition{index - 1}", self._make_transition(channels, wanted, eps))
            modules = []
            for _ in range(stage["num_modules"]):
                module = HMSHRNetModule(wanted if not modules else modules[-1].out_channels, stage, eps, align_corners)
                modules.append(module)
            setattr(self, f"stage{index}", nn.Sequential(*modules))
            channels = modules[-1].out_channels
        self.num_stages = len(stages)
        self.out_channels = sum(channels)

    @staticmethod
    def _make_transition(previous: list[int], wanted: list[int], eps: float) -> nn.ModuleList:
        """Adapt existing branches whose width changes (3x3 conv) and derive each new branch from the lowest one."""
        layers = nn.ModuleList()
        for branch, channels in enumerate(wanted):
            if branch < len(previous):
                if previous[branch] == channels:
                    layers.append(nn.Identity())
                else:
                    layers.append(conv_bn(previous[branch], channels, 3, 1, eps, relu=True))
            else:
                steps = branch + 1 - len(previous)
                layers.append(
                    nn.Sequential(
                        *(
                            conv_bn(previous[-1], channels if step == steps - 1 else previous[-1], 3, 2, eps, relu=True)
                            for step in range(steps)
                        )
                    )
                )
        return layers

    def _check_batch_statistics(self, pixel_values: torch.Tensor) -> None:
        """
        Refuse, naming the fix, an input whose lowest-resolution branch would give its BatchNorm layers a single value
        per channel in training mode (one image that is 1x1 there), where PyTorch would fail deep inside the trunk.
        """
        lowest_branch = getattr(self, f"stage{self.num_stages}")[-1].branches[-1]
        norm = next(module for module in lowest_branch.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm))
        if not norm.training or pixel_values.shape[0] != 1:
            return
        height, width = pixel_values.shape[-2:]
        for _ in range(self.num_stages + 1):  # the two stem convolutions, then one per added branch: stride 2, ceil
            height, width = (height + 1) // 2, (width + 1) // 2
        if height * width == 1 and not normalises_across_processes(norm):
            stride = 2 ** (self.num_stages + 1)
            raise ValueError(
                "the HRNet trunk needs more than one value per channel for BatchNorm in training mode, but one image "
                f"of {pixel_values.shape[-2]}x{pixel_values.shape[-1]} pixels (batch_size 1) is 1x1 at its stride-"
                f"{stride} branch; train with a batch of at least 2, on crops with a side longer than {stride} pixels "
                "at the lowest training scale, with SyncBatchNorm over several GPUs (--sync_bn), or with the "
                "BatchNorm layers in eval mode (frozen statistics)"
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_batch_statistics(pixel_values)
        hidden = self.relu(self.bn1(self.conv1(pixel_values)))
        hidden = self.relu(self.bn2(self.conv2(hidden)))
        branch_states = [self.layer1(hidden)]
        for index in range(2, self.num_stages + 1):
            transition = getattr(self, f"transition{index - 1}")
            inputs = []
            for branch, layer in enumerate(transition):
                # new branches grow from the lowest-resolution branch of the previous stage
                source = branch_states[min(branch, len(branch_states) - 1)]
                inputs.append(layer(source))
            branch_states = getattr(self, f"stage{index}")(inputs)
        height, width = branch_states[0].shape[-2:]
        resized = [branch_states[0]] + [
            F.interpolate(state, size=(height, width), mode="bilinear", align_corners=self.align_corners)
            for state in branch_states[1:]
        ]
        return torch.cat(resized, dim=1)
