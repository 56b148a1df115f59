"""Started by `torchrun` / `accelerate launch` in tests: trains with one of our scripts, then writes what this rank saw.

`rank<R>.json` holds the parameter checksum of this process's model after training, the training sample ids it read,
the evaluation images it read, the loss terms of each of its training steps and what `torch.compile` captured, so the
test can check that gradients were all-reduced (identical parameters), that ranks read disjoint shards, that
evaluation covered every image, that the logged loss terms are means over the processes and that --torch_compile
compiled.
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


def write_report(report_dir: Path, model: torch.nn.Module, is_distributed: bool, extra: dict) -> None:
    from torch._dynamo.utils import counters

    rank = int(os.environ.get("RANK", 0))
    sync_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    report = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "distributed": is_distributed,
              "parameters": parameter_digest(model), "sync_batch_norm": sync_bn,
              # what torch.compile (--torch_compile) captured in this process
              "compiled_graphs": counters["stats"]["unique_graphs"], "graph_breaks": dict(counters["graph_break"]),
              **extra}
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))


def record(dataset_class: type, indices: list[int]) -> None:
    """Make `dataset_class.__getitem__` note each index it is asked for in `indices`."""
    original_getitem = dataset_class.__getitem__

    def recording_getitem(self, index):
        indices.append(int(index))
        return original_getitem(self, index)

    dataset_class.__getitem__ = recording_getitem


def main() -> int:
    script, report_dir, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    from hms_segmentation.data.training import SegmentationTrainingDataset
    from hms_segmentation.training.arguments import parse_arguments
    from hms_segmentation.training.datasets import SegmentationEvalDataset

    read_indices: list[int] = []
    evaluated_indices: list[int] = []
    record(SegmentationTrainingDataset, read_indices)
    record(SegmentationEvalDataset, evaluated_indices)
    loss_terms: list[dict[str, float]] = []  # of each training forward of this process

    def record_loss_terms(module, inputs, output):
        if module.training and getattr(output, "loss_terms", None):
            loss_terms.append({name: float(value) for name, value in output.loss_terms.items()})

    from hms_segmentation import HMSForSemanticSegmentation

    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: record_loss_terms(module, inputs, output)
        if isinstance(module, HMSForSemanticSegmentation) else None
    )
    trained = {}  # this process's model after the last step, before any evaluation, and whether it ran distributed

    def keep(model: torch.nn.Module) -> None:
        trained.update(model=model, distributed=torch.distributed.is_available() and torch.distributed.is_initialized())

    arguments = parse_arguments(argv)
    if script == "accelerate":
        from hms_segmentation.training import train_accelerate

        train_accelerate.run_training(*arguments, on_train_end=lambda model, accelerator: keep(model))
    else:
        from transformers import TrainerCallback

        from hms_segmentation.training.train import run_training

        class KeepModel(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                keep(model)

        run_training(*arguments, callbacks=[KeepModel()])
    hook.remove()
    write_report(report_dir, trained["model"], trained["distributed"],
                 {"script": script, "indices": read_indices, "evaluated": evaluated_indices, "loss_terms": loss_terms})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
