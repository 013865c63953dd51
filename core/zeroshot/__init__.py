"""Zero-shot image classification for applications: Python API, ONNX export, ONNX-backed classify.

    from domainclip.core.zeroshot import ZeroShotClassifier

    classifier = ZeroShotClassifier.from_pretrained("runs/my_run")   # or a model folder / id
    results = classifier.classify(["leaf.jpg"], ["healthy leaf", "apple scab"], top_k=1)
    results[0].label, results[0].probability

See ``docs/zeroshot.md``.
"""
from .classifier import (
    MethodHead,
    PromptEnsembleHead,
    ZeroShotClassifier,
    ZeroShotResult,
    check_labels,
    rank,
    results_to_rows,
)
from .images import ImagePreparer, as_image_list
from .loading import DEFAULT_TEMPLATES, LoadedModel, load_model, model_config_for
from .onnx import OnnxZeroShotClassifier, export_onnx

__all__ = [
    "DEFAULT_TEMPLATES",
    "ImagePreparer",
    "LoadedModel",
    "MethodHead",
    "OnnxZeroShotClassifier",
    "PromptEnsembleHead",
    "ZeroShotClassifier",
    "ZeroShotResult",
    "as_image_list",
    "check_labels",
    "export_onnx",
    "load_model",
    "model_config_for",
    "rank",
    "results_to_rows",
]
