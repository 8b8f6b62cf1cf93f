"""Parameter-efficient fine-tuning methods, one file each, sharing ``core.PeftModel``."""

from minipeft.peft.core import PeftConfig, PeftLayer, PeftModel, get_peft_model
from minipeft.peft.selective import (
    SelectiveConfig,
    bitfit,
    embedding_only,
    full_finetuning,
    last_blocks,
)

__all__ = ["PeftConfig", "PeftLayer", "PeftModel", "get_peft_model", "SelectiveConfig",
           "bitfit", "embedding_only", "full_finetuning", "last_blocks"]
