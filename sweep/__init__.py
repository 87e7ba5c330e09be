"""sweep: GPU energy per LLM response, across models, tasks and GPUs."""

__version__ = "0.1.0"
