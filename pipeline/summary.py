"""``python -m pipeline summary``: after ``make demo``, say where the results are and how to look at them."""

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.evaluation import HEADLINE


def main(params: Params) -> None:
    p = params.paths
    metrics = json.loads(Path(p.metrics).read_text()) if Path(p.metrics).is_file() else {}
    print("\nPipeline finished.")
    if metrics:
        # A metric can be undefined (AUROC when the test split lacks a class) and is then not in the file.
        print("  test metrics   " + "  ".join(f"{m}={metrics[f'test/{m}']:.3f}" for m in HEADLINE
                                             if f"test/{m}" in metrics))
        if not metrics.get("weights/pretrained", True):
            print("  WARNING        trained from random init: ImageNet weights could not be downloaded (see report)")
    print(f"  metrics        {p.metrics}        (dvc metrics show)")
    print(f"  plots          {p.plots}/, {p.confusion}, {p.augment_preview}   (dvc plots show)")
    print(f"  report         {p.report}")
    print(f"  model          {p.model_dir}/")
    print(f"  MLflow UI      make ui   (or: mlflow ui --backend-store-uri {params.mlflow.tracking_uri})")
