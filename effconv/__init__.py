"""effconv: convert pretrained softmax Transformers into efficient architectures and distill the quality back."""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling import EffconvConfig, EffconvForCausalLM

__version__ = "0.1.0"

# Registration lets AutoModelForCausalLM load effconv exports without trust_remote_code once effconv is imported.
AutoConfig.register("effconv", EffconvConfig, exist_ok=True)
AutoModelForCausalLM.register(EffconvConfig, EffconvForCausalLM, exist_ok=True)
