"""Prompt learning: CoOp, CoCoOp and MaPLe-style deep multimodal prompts on frozen towers (open_clip and
Hugging Face CLIP; dual encoders with a BERT-like text encoder and a timm / open_clip ViT)."""
from .cocoop import CoCoOp, CoCoOpPrompts
from .config import CoCoOpConfig, CoOpConfig, MaPLeConfig
from .coop import CoOp, CoOpPrompts
from .dual_encoders import BertLikeTextEncoder, DualEncoderVisionEncoder, TimmVisionEncoder
from .maple import MaPLe, MaPLePrompts
from .model import PromptedBackbone, PromptLearner, PromptLearningMethod
from .text_encoders import PromptLayout, PromptTextEncoder, build_text_encoder
from .vision_encoders import PromptVisionEncoder, build_vision_encoder

__all__ = ["BertLikeTextEncoder", "CoCoOp", "CoCoOpConfig", "CoCoOpPrompts", "CoOp", "CoOpConfig",
           "CoOpPrompts", "DualEncoderVisionEncoder", "MaPLe", "MaPLeConfig", "MaPLePrompts", "PromptLayout",
           "PromptLearner", "PromptLearningMethod", "PromptTextEncoder", "PromptVisionEncoder",
           "PromptedBackbone", "TimmVisionEncoder", "build_text_encoder", "build_vision_encoder"]
