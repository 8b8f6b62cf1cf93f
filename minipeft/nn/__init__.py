"""Neural-network layers and the GPT model, built on minipeft.autograd."""

from minipeft.nn.attention import SelfAttention
from minipeft.nn.generate import generate
from minipeft.nn.gpt import GPT, MLP, Block, GPTConfig
from minipeft.nn.layers import Dropout, Embedding, LayerNorm, Linear
from minipeft.nn.module import Module, ModuleList, Parameter, StateDictError

__all__ = ["GPT", "GPTConfig", "Block", "MLP", "SelfAttention", "Linear", "Embedding",
           "LayerNorm", "Dropout", "Module", "ModuleList", "Parameter", "StateDictError",
           "generate"]
