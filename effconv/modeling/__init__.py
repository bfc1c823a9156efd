"""effconv's model code. The files here are copied verbatim into every exported model directory."""

from .configuration_effconv import ATTENTION_TYPES, EffconvConfig
from .modeling_effconv import EffconvCache, EffconvForCausalLM, EffconvModel

MODELING_FILES = ("configuration_effconv.py", "modeling_effconv.py", "attention_ops.py", "moe.py", "backend.py",
                  "fast_generate.py")

__all__ = ["ATTENTION_TYPES", "MODELING_FILES", "EffconvCache", "EffconvConfig", "EffconvForCausalLM", "EffconvModel"]
