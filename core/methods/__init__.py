"""Adaptation methods, each registered in one line; an unknown name fails loudly."""
from .base import METHODS, AdaptationMethod, MethodConfig, TaskInfo, build_method, register_method
from . import full  # noqa: F401  (registers "full")
from . import lora  # noqa: F401  (registers "lora")
from . import prompt_learning  # noqa: F401  (registers "coop", "cocoop", "maple")
from . import linear_probe  # noqa: F401  (registers "linear_probe")
from . import projector  # noqa: F401  (registers "projector")
from . import tip_adapter  # noqa: F401  (registers "tip_adapter")
from . import cross_lingual  # noqa: F401  (registers "teacher", "one_to_k")
from . import distill  # noqa: F401  (registers "distill")
from . import adversarial  # noqa: F401  (registers "fare", "tecoa")

__all__ = ["METHODS", "AdaptationMethod", "MethodConfig", "TaskInfo", "build_method", "register_method"]
