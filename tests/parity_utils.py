"""Rebuild the reference state dicts of `shared/parity/<family>/` (stored or procedural) and read their vectors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_reference_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The reference model's state dict (NVIDIA key names, no prefix), float tensors as float32."""
    stored = folder / "reference_state_dict.safetensors"
    if stored.exists():
        return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(stored)).items()}
    spec = json.loads((folder / "weights_spec.json").read_text())
    bn_state = load_file(str(folder / spec["stored_file"]))
    state_dict = {}
    for index, key in enumerate(sorted(spec["tensors"])):
        entry = spec["tensors"][key]
        if entry["kind"] == "stored":
            tensor = bn_state[key]
            state_dict[key] = tensor.float() if tensor.is_floating_point() else tensor
        elif entry["kind"] == "normal":
            generator = torch.Generator(device="cpu").manual_seed(spec["base_seed"] + index)
            tensor = torch.randn(entry["shape"], generator=generator, dtype=torch.float32)
            tensor = tensor * torch.tensor(entry["std"], dtype=torch.float32) + entry["mean"]
            state_dict[key] = tensor.half().float()
        else:
            raise ValueError(f"{folder}: unknown tensor kind {entry['kind']!r} for {key}")
    return state_dict


def write_nvidia_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """Wrap a state dict the way NVIDIA's training code saves it (DataParallel `module.` prefix, extra fields)."""
    torch.save(
        {
            "epoch": 0,
            "arch": "network.ocrnet.HRNet_Mscale",
            "num_classes": 19,
            "state_dict": {"module." + key: value for key, value in state_dict.items()},
            "optimizer": {},
            "mean_iu": 0.0,
            "command": "python train.py",
        },
        path,
    )
    return path


def parity_families(parity_dir: Path) -> list[Path]:
    return sorted(p for p in parity_dir.iterdir() if p.is_dir() and (p / "vectors.safetensors").exists())


def scale_name(kind: str, scale: float) -> str:
    """The reference's tensor naming: `pred_0.5x`, `attn_1.0x` (`str(float(scale))`)."""
    return f"{kind}_{float(scale)}x"
