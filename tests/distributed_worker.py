"""Started by `torchrun` / `accelerate launch` in tests: trains with one of our scripts, then writes what this rank saw.

`rank<R>.json` holds the parameter checksum of this process's model after training and the sample ids it read, so
the test can check that gradients were all-reduced (identical parameters) and that ranks read disjoint shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def parameter_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    # parameters only: without SyncBatchNorm each process keeps its own running statistics (buffers)
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_report(report_dir: Path, model: torch.nn.Module, extra: dict) -> None:
    rank = int(os.environ.get("RANK", 0))
    is_distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    sync_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    report = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "distributed": is_distributed,
              "parameters": parameter_digest(model), "sync_batch_norm": sync_bn, **extra}
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))


def main() -> int:
    script, report_dir, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    from hms_segmentation.data.training import SegmentationTrainingDataset
    from hms_segmentation.training.arguments import parse_arguments

    read_indices: list[int] = []
    original_getitem = SegmentationTrainingDataset.__getitem__

    def recording_getitem(self, index):
        read_indices.append(int(index))
        return original_getitem(self, index)

    SegmentationTrainingDataset.__getitem__ = recording_getitem

    arguments = parse_arguments(argv)
    if script == "accelerate":
        from hms_segmentation.training import train_accelerate

        train_accelerate.run_training(
            *arguments, on_train_end=lambda model, accelerator: write_report(report_dir, model, {"script": script, "indices": read_indices})
        )
    else:
        from transformers import TrainerCallback

        from hms_segmentation.training.train import run_training

        class Report(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                write_report(report_dir, model, {"script": script, "indices": read_indices})

        run_training(*arguments, callbacks=[Report()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
