"""Prompt learning: CoOp, CoCoOp and MaPLe-style deep multimodal prompts on frozen towers of any
backbone family that provides prompt-aware towers (``Backbone.prompt_text_encoder`` /
``prompt_vision_encoder``: open_clip, Hugging Face CLIP and SigLIP, SigLIP 2, dual encoders with a
BERT-like text encoder and a timm / open_clip ViT)."""
from .cocoop import CoCoOp, CoCoOpPrompts
from .config import CoCoOpConfig, CoOpConfig, MaPLeConfig
from .coop import CoOp, CoOpPrompts
from .maple import MaPLe, MaPLePrompts
from .model import PromptedBackbone, PromptLearner, PromptLearningMethod

__all__ = ["CoCoOp", "CoCoOpConfig", "CoCoOpPrompts", "CoOp", "CoOpConfig", "CoOpPrompts", "MaPLe", "MaPLeConfig",
           "MaPLePrompts", "PromptLearner", "PromptLearningMethod", "PromptedBackbone"]
