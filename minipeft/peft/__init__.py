"""Parameter-efficient fine-tuning methods, one file each, sharing ``core.PeftModel``.

The house: ``layer.py`` (the interface every PEFT layer implements), ``config.py`` (what every
config shares, and the method registry), ``targets.py`` (which modules a config names),
``core.py`` (PeftModel: apply, switch, save, load, merge, through the interface only),
``files.py`` (an adapter folder on disk: written as a whole, read with every check),
``tokens.py`` (trainable token rows, an option of every config), and one file per method. A new
method is its file plus its import line below (importing it registers its config).
"""

from minipeft.peft.adapters import AdapterConfig, AdapterLayer, Bottleneck
from minipeft.peft.config import PeftConfig
from minipeft.peft.core import PeftModel, get_peft_model, load_peft_model, read_adapter
from minipeft.peft.ia3 import IA3Config, IA3Linear, IA3Vector
from minipeft.peft.layer import MergedAdapterError, PeftLayer
from minipeft.peft.lora import LoraConfig, LoRAEmbedding, LoRAFactors, LoRALinear
from minipeft.peft.lora_merge import add_weighted_adapter
from minipeft.peft.prefix import (
    PrefixEncoder,
    PrefixMLP,
    PrefixTable,
    PrefixTuningConfig,
    collapse_prefix,
)
from minipeft.peft.prompt import PromptEncoder, PromptTuningConfig, SoftPrompt
from minipeft.peft.selective import (
    Selection,
    SelectiveConfig,
    bitfit,
    embedding_only,
    full_finetuning,
    last_blocks,
)
from minipeft.peft.softprompt_analysis import nearest_tokens, neighbour_purity, random_baseline
from minipeft.peft.tokens import TrainableTokens

__all__ = ["PeftConfig", "PeftLayer", "PeftModel", "get_peft_model", "load_peft_model",
           "read_adapter", "MergedAdapterError", "TrainableTokens", "Selection",
           "SelectiveConfig",
           "bitfit", "embedding_only", "full_finetuning", "last_blocks",
           "LoraConfig", "LoRALinear", "LoRAEmbedding", "LoRAFactors", "add_weighted_adapter",
           "AdapterConfig", "AdapterLayer", "Bottleneck", "IA3Config", "IA3Linear", "IA3Vector",
           "PromptTuningConfig", "PromptEncoder", "SoftPrompt", "PrefixTuningConfig",
           "PrefixEncoder", "PrefixTable", "PrefixMLP", "collapse_prefix", "nearest_tokens",
           "neighbour_purity", "random_baseline"]
