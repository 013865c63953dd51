"""The one training loop, the run folder it writes, and rebuilding runs from it."""
from .loop import TrainResult, load_run_config, train
from .run_loading import build_model, load_trained

__all__ = ["TrainResult", "build_model", "load_run_config", "load_trained", "train"]
