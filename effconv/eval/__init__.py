"""effconv eval: quality (perplexity, length evaluation, lm-eval tasks, generations) and speed of a model beside
its teacher."""

from .run import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
