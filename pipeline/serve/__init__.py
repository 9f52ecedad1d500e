"""Using a trained model outside the pipeline: ``shipped`` loads it from ``models/`` and packages it with its
preprocessing (what the train stage logs to MLflow), ``predict`` classifies image files, ``export`` writes
TorchScript or ONNX.

Submodules are imported explicitly, so that the train stage, which logs the shipped model, does not depend on
predict's readers or the evaluate stage's decision.
"""
