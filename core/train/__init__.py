"""The one training loop and the run folder it writes."""
from .loop import TrainResult, build_model, load_run_config, train
from .run_folder import load_trained

__all__ = ["TrainResult", "build_model", "load_run_config", "load_trained", "train"]
