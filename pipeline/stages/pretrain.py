"""pretrain: self-supervised pretraining of the backbone on the train split and the unlabelled pool (never val or
test), when pretrain.method is simclr or byol; model.weights: pretrain then starts train from it.

One MLflow run per pretraining (the loss per epoch, the frozen features' kNN accuracy on val every
pretrain.knn_every epochs); a killed run resumes where it stopped (pipeline.training.resume); under DDP rank 0
owns the run and the output.
"""
# The work is pipeline.training.pretraining.

import argparse

from pipeline.config import Params
from pipeline.environ import use_cpu_threads
from pipeline.stages.tracked import open_tracking


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine).
    from lightning.pytorch.utilities import rank_zero_only

    from pipeline.training import pretraining

    use_cpu_threads(params.train.cpu_threads)  # as the train stage: the same numbers on any machine
    if params.pretrain.method == "none":
        pretraining.run(params, {})
        print(f"pretrain: pretrain.method none, nothing to do -> {params.paths.pretrain}")
        return
    tags = open_tracking(params) if getattr(rank_zero_only, "rank", 0) == 0 else None
    record = pretraining.run(params, tags)
    if tags is not None:
        knn = "" if record.knn_accuracy is None else f", val kNN accuracy {record.knn_accuracy:.3f}"
        print(
            f"pretrain: {record.method}, {record.epochs} epochs on {record.images} images, loss "
            f"{record.final_loss:.4f}{knn} -> {params.paths.pretrain} (MLflow: the run tagged stage pretrain)"
        )
