"""ctkd-bench: a benchmark and evaluation harness for cross-tokenizer knowledge distillation of LLMs."""

__version__ = "0.1.0"
