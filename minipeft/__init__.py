"""minipeft: parameter-efficient fine-tuning built from scratch on arrays,
as a textbook that runs."""

__version__ = "0.1.0"
