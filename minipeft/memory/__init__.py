"""Memory of one training step, predicted from the model and its graph, and measured.

A training step (forward, backward, AdamW update) holds five kinds of bytes:

    weights      W = every parameter                         resident before the step
    optimizer    O = AdamW's m and v: 2 x each trainable tensor   resident before the step
    gradients    G = one gradient per trainable tensor        made by backward
    activations  A = what the graph keeps alive for backward  made by forward
    workspace    the temporaries of the busiest single backward op

PEFT shrinks G and O (frozen tensors get neither); it does not shrink A, because the
activations of a frozen layer are still needed to pass the gradient *through* it. A masked
tensor (selective fine-tuning with an element mask) still gets a *full-size* gradient and full
m and v: the mask is applied to the update, not to the arithmetic.

Three rooms, one concept each:

    formulas.py   W, G, O from parameter counts; our GPT's activations as a formula
    graph.py      the walk of a real graph, reading what each op declares it saves
    meter.py      one step measured by the allocator, beside the prediction (StepMemory)
"""

from minipeft.memory.formulas import (
    gpt_activation_breakdown,
    gpt_activation_bytes,
    parameter_bytes,
    training_memory_formula,
)
from minipeft.memory.graph import forward_with_groups, graph_activations
from minipeft.memory.meter import StepMemory, measure_forward, measure_step

__all__ = ["StepMemory", "measure_step", "measure_forward", "graph_activations",
           "forward_with_groups", "parameter_bytes", "training_memory_formula",
           "gpt_activation_breakdown", "gpt_activation_bytes"]
