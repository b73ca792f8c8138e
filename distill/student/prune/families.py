"""Which architectures can be pruned, and which axis of every weight belongs to which prunable space.

A *space* is a set of channels that must be pruned together wherever it appears:

- ``hidden``: the residual stream (embedding columns, norm weights, every projection reading or writing it);
- ``q.{i}`` / ``kv.{i}``: the query and key/value output channels of attention layer ``i`` (``heads * head_dim``);
- ``mlp.{i}``: the intermediate channels of the MLP of layer ``i``.

Each parameter of a supported model is described by one axis label per dimension (``None`` = never pruned). Any
parameter that matches no rule makes the model unsupported: we refuse rather than write a model that loads with
random weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PretrainedConfig

from kd_core.config import ConfigError

# An axis label template: "{i}" is replaced by the layer index.
Axes = tuple[str | None, ...]


@dataclass(frozen=True)
class Family:
    """How one architecture family lays out its weights."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layers_prefix: str  # state-dict prefix of the layer list, e.g. "model.layers."
    rules: tuple[tuple[str, Axes], ...]  # (regex on the key after the layer prefix or the full key, axes)
    attn_out_proj: str  # module name (inside a layer) whose *input* is the concatenated attention heads
    mlp_down_proj: str  # module name (inside a layer) whose *input* is the MLP intermediate activation
    norm_modules: str  # regex of module names (full) whose outputs are hidden-size activations
    grouped_query: bool  # attention may share key/value heads between query heads (num_key_value_heads)
    explicit_head_dim: bool  # the config has a ``head_dim`` field honoured by the modeling code

    def axes(self, key: str) -> tuple[Axes, int | None]:
        """Axis labels of a state-dict key (``{i}`` filled in) and its layer index, or ConfigError."""
        layer: int | None = None
        local = key
        if key.startswith(self.layers_prefix):
            index, _, local = key[len(self.layers_prefix) :].partition(".")
            layer = int(index)
        for pattern, axes in self.rules:
            # "L:" rules describe weights inside a layer (matched after the layer prefix); others match the full key.
            in_layer = pattern.startswith("L:")
            if in_layer == (layer is not None) and re.fullmatch(pattern.removeprefix("L:"), local):
                return tuple(a.format(i=layer) if a else None for a in axes), layer
        raise ConfigError(
            f"model: weight '{key}' is not part of the known {self.name} layout; this variant cannot be pruned safely"
        )


_DECODER_LAYER_RULES: tuple[tuple[str, Axes], ...] = (
    (r"L:self_attn\.q_proj\.weight", ("q.{i}", "hidden")),
    (r"L:self_attn\.q_proj\.bias", ("q.{i}",)),
    (r"L:self_attn\.[kv]_proj\.weight", ("kv.{i}", "hidden")),
    (r"L:self_attn\.[kv]_proj\.bias", ("kv.{i}",)),
    (r"L:self_attn\.o_proj\.weight", ("hidden", "q.{i}")),
    (r"L:self_attn\.o_proj\.bias", ("hidden",)),
    # Qwen3 normalises each head over head_dim; head_dim itself is never pruned.
    (r"L:self_attn\.[qk]_norm\.weight", (None,)),
    (r"L:mlp\.(gate|up)_proj\.weight", ("mlp.{i}", "hidden")),
    (r"L:mlp\.(gate|up)_proj\.bias", ("mlp.{i}",)),
    (r"L:mlp\.down_proj\.weight", ("hidden", "mlp.{i}")),
    (r"L:mlp\.down_proj\.bias", ("hidden",)),
    (r"L:(input_layernorm|post_attention_layernorm)\.weight", ("hidden",)),
    (r"model\.embed_tokens\.weight", (None, "hidden")),
    (r"model\.norm\.weight", ("hidden",)),
    (r"lm_head\.weight", (None, "hidden")),
)

DECODER = Family(
    name="decoder (Llama/Mistral/Qwen2/Qwen3)",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    layers_prefix="model.layers.",
    rules=_DECODER_LAYER_RULES,
    attn_out_proj="self_attn.o_proj",
    mlp_down_proj="mlp.down_proj",
    norm_modules=r"model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm)|norm)",
    grouped_query=True,
    explicit_head_dim=True,
)

BERT = Family(
    name="BERT encoder",
    model_types=("bert",),
    architectures=("BertModel",),
    layers_prefix="encoder.layer.",
    rules=(
        (r"L:attention\.self\.(query|key|value)\.weight", ("q.{i}", "hidden")),
        (r"L:attention\.self\.(query|key|value)\.bias", ("q.{i}",)),
        (r"L:attention\.output\.dense\.weight", ("hidden", "q.{i}")),
        (r"L:(attention\.output|output)\.dense\.bias", ("hidden",)),
        (r"L:(attention\.output|output)\.LayerNorm\.(weight|bias)", ("hidden",)),
        (r"L:intermediate\.dense\.weight", ("mlp.{i}", "hidden")),
        (r"L:intermediate\.dense\.bias", ("mlp.{i}",)),
        (r"L:output\.dense\.weight", ("hidden", "mlp.{i}")),
        (r"embeddings\.(word|position|token_type)_embeddings\.weight", (None, "hidden")),
        (r"embeddings\.LayerNorm\.(weight|bias)", ("hidden",)),
        (r"embeddings\.position_ids", (None, None)),
        (r"pooler\.dense\.weight", ("hidden", "hidden")),
        (r"pooler\.dense\.bias", ("hidden",)),
    ),
    attn_out_proj="attention.output.dense",
    mlp_down_proj="output.dense",
    norm_modules=r"(embeddings\.LayerNorm|encoder\.layer\.\d+\.(attention\.output|output)\.LayerNorm)",
    grouped_query=False,
    explicit_head_dim=False,
)

FAMILIES = (DECODER, BERT)


def family_for(config: PretrainedConfig) -> Family:
    """The family of a config, or ConfigError naming what is supported."""
    architectures = tuple(config.architectures or ())
    for family in FAMILIES:
        if config.model_type in family.model_types:
            if not architectures or architectures[0] not in family.architectures:
                raise ConfigError(
                    f"model: architecture {architectures[0] if architectures else '(none)'} is not supported for "
                    f"pruning; expected one of {', '.join(family.architectures)}"
                )
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(f"model: model_type '{config.model_type}' is not supported for pruning (supported: {supported})")


def head_dim(config: PretrainedConfig, family: Family) -> int:
    """The per-head width the modeling code actually uses (an explicit ``head_dim`` wins for decoders)."""
    if family.explicit_head_dim:
        # Llama/Mistral/Qwen3 configs declare head_dim; Qwen2's does not, but its attention reads the attribute when
        # present (transformers 5.23: getattr(config, "head_dim", hidden_size // num_attention_heads)).
        explicit = getattr(config, "head_dim", None)
        if explicit:
            return int(explicit)
    return config.hidden_size // config.num_attention_heads


def num_kv_heads(config: PretrainedConfig, family: Family) -> int:
    """Key/value heads (equal to the query heads for models without grouped-query attention)."""
    if family.grouped_query:
        return int(config.num_key_value_heads)
    return int(config.num_attention_heads)
