"""What every method's config shares: the registry, saving to JSON and back, and the options
that work with any method.

Each method is a frozen dataclass subclassing ``PeftConfig``, with a ``method`` name (the key
in ``CONFIG_CLASSES``, filled in as each class is defined, and the ``method`` written into saved
files) and ``apply(model, name, seed)``: the surgery that gives a frozen model adapter ``name``.

Options of every config:
  * ``trainable_token_indices``: rows of the token embedding that train as well (with a tied
    head, the same rows of the output layer), for any method; as Hugging Face PEFT's option
    of the same name. See ``tokens.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from minipeft import checks
from minipeft.io import CheckpointError
from minipeft.peft import tokens

CONFIG_CLASSES: dict = {}  # method name -> config class, filled in as each method file loads


@dataclass(frozen=True)
class PeftConfig:
    """Base of every method's config."""

    # rows of tok_emb (and a tied head) that train too; None: none (keyword only, so each
    # method's own fields keep their positions)
    trainable_token_indices: tuple | None = field(default=None, kw_only=True)

    method: ClassVar[str] = "base"
    mergeable: ClassVar[bool] = False  # can the update be folded into the base weights?

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CONFIG_CLASSES[cls.method] = cls

    def __post_init__(self):
        if self.trainable_token_indices is not None:
            object.__setattr__(self, "trainable_token_indices", checks.check_int_tuple(
                f"{type(self).__name__}.trainable_token_indices", self.trainable_token_indices,
                low=0, allow_empty=False))

    def apply(self, model, name: str, seed: int) -> list[str]:
        """Change ``model`` (already frozen) for adapter ``name``; return what was touched.
        Everything is checked before the first module changes."""
        raise NotImplementedError

    def install(self, model, name: str, seed: int) -> list[str]:
        """``apply`` plus the options every method has (trainable token rows)."""
        if self.trainable_token_indices is not None:   # checked before any surgery
            tokens.check_rows(model, self.trainable_token_indices, type(self).__name__)
        touched = self.apply(model, name, seed)
        if self.trainable_token_indices is not None:
            touched += tokens.add_rows(model, name, self.trainable_token_indices)
        return touched

    def loadable(self) -> PeftConfig:
        """The config to build an adapter with before a file fills it in (a method whose
        init needs more than the file holds returns a simpler one); default: itself."""
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict):
        """The config a saved ``to_dict`` describes. Unknown fields are refused; top-level lists
        become tuples (nested ones stay lists, which the field checks refuse)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{cls.__name__}: the saved config is not a JSON object")
        unknown = sorted(set(d) - set(cls().to_dict()))
        if unknown:
            raise CheckpointError(f"{cls.__name__}: unknown fields {unknown} in adapter config")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
