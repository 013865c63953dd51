"""Prompt learning: CoOp, CoCoOp and MaPLe-style deep multimodal prompts on frozen CLIP towers."""
from .cocoop import CoCoOp, CoCoOpPrompts
from .config import CoCoOpConfig, CoOpConfig, MaPLeConfig
from .coop import CoOp, CoOpPrompts
from .maple import MaPLe, MaPLePrompts
from .model import PromptedBackbone, PromptLearner, PromptLearningMethod
from .text_encoders import PromptLayout, PromptTextEncoder, build_text_encoder
from .vision_encoders import PromptVisionEncoder, build_vision_encoder

__all__ = ["CoCoOp", "CoCoOpConfig", "CoCoOpPrompts", "CoOp", "CoOpConfig", "CoOpPrompts", "MaPLe", "MaPLeConfig",
           "MaPLePrompts", "PromptLayout", "PromptLearner", "PromptLearningMethod", "PromptTextEncoder",
           "PromptVisionEncoder", "PromptedBackbone", "build_text_encoder", "build_vision_encoder"]
