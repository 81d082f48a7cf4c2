"""FlextronConfig: the shape of an elastic transformer and each layer's width choices."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

ARCHITECTURES = ("llama", "gpt2", "bert")
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MLP_WIDTH_MULTIPLE = 128


def mlp_width_choices(ffn: int, fractions=DEFAULT_FRACTIONS, multiple: int = MLP_WIDTH_MULTIPLE) -> list[int]:
    """MLP widths for ``fractions`` of ``ffn``, rounded to multiples of ``multiple`` neurons
    (to the nearest, at least one multiple; the full width is always the last choice)."""
    if ffn <= multiple:
        values = {max(1, round(ffn * f)) for f in fractions}
    else:
        values = {min(ffn, max(multiple, round(ffn * f / multiple) * multiple)) for f in fractions}
    return sorted(values | {ffn})


def head_choices(q_heads: int, kv_heads: int, fractions=DEFAULT_FRACTIONS) -> list[int]:
    """Query-head counts for ``fractions`` of ``q_heads``, rounded to multiples of the GQA
    group (at least one group; all heads always the last choice)."""
    group = q_heads // kv_heads
    values = {min(q_heads, max(group, round(q_heads * f / group) * group)) for f in fractions}
    return sorted(values | {q_heads})


@dataclass
class FlextronConfig:
    """Architecture and elastic choices.

    ``arch``: ``llama`` (RMSNorm, rotary, GQA, SwiGLU, optional QKV biases; also Mistral,
    Qwen2 and Qwen3 checkpoints) or ``gpt2`` (LayerNorm, learned positions, GELU-tanh, biases,
    tied embeddings); ``bert`` for encoders (post-LayerNorm, GELU, absolute positions and
    ``type_vocab_size`` token types). ``qkv_bias`` / ``out_bias``: Q/K/V and O projection biases in a
    ``llama`` model (Qwen2 has the first, Llama's ``attention_bias`` both). ``rope_scaling``: None
    or a checkpoint's RoPE scaling (``linear``, ``llama3``, ``yarn``; see
    :mod:`flextron_kernels.nn.rotary`). ``sliding_window``: None, or a causal attention
    window (Mistral, Qwen2): a token attends to the last ``sliding_window`` positions up to
    its own, in the layers ``window_layers`` lists (None: every layer).
    ``qk_norm``: an RMSNorm over each query and key head before the rotary embeddings
    (Qwen3; ``llama`` only). ``mlp_choices[i]`` / ``head_choices[i]``: layer ``i``'s allowed MLP
    widths and query-head counts, ascending, the full size last. ``permutations``: the
    importance ordering applied at conversion; ``hf_model_type``: the source checkpoint's type.
    """

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    q_heads: int
    kv_heads: int
    ffn: int
    head_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 2048
    qkv_bias: bool = False
    out_bias: bool = False
    tie_embeddings: bool = False
    mlp_choices: list = field(default_factory=list)
    head_choices: list = field(default_factory=list)
    permutations: dict = field(default_factory=dict)
    hf_model_type: Optional[str] = None
    type_vocab_size: int = 0
    layer_sizes: list = field(default_factory=list)
    rope_scaling: Optional[dict] = None
    sliding_window: Optional[int] = None
    window_layers: Optional[list] = None
    qk_norm: bool = False

    def __post_init__(self):
        from flextron_kernels.nn.rotary import check_rope_scaling

        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch: expected one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.rope_scaling is not None and self.arch != "llama":
            raise ValueError(f"rope_scaling: expected None for arch {self.arch!r} (only a llama model has rotary "
                             f"embeddings to scale), got {self.rope_scaling!r}")
        check_rope_scaling(self.rope_scaling)
        if self.qk_norm and self.arch != "llama":
            raise ValueError(f"qk_norm: expected False for arch {self.arch!r} (a llama model's option), got True")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ValueError(f"sliding_window: expected None or a positive int, got {self.sliding_window!r}")
        if self.window_layers is not None and (self.sliding_window is None or sorted(set(self.window_layers))
                                               != list(self.window_layers) or not set(self.window_layers)
                                               <= set(range(self.n_layers))):
            raise ValueError(f"window_layers: expected None or distinct ascending layer indices in [0, {self.n_layers}) "
                             f"with a sliding_window, got {self.window_layers!r} (sliding_window={self.sliding_window!r})")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of q_heads={self.q_heads}, got {self.kv_heads}")
        if self.head_dim is None:
            self.head_dim = self.d_model // self.q_heads
        group = self.q_heads // self.kv_heads
        if self.layer_sizes:
            if len(self.layer_sizes) != self.n_layers:
                raise ValueError(f"layer_sizes: expected one [ffn, q_heads] per layer ({self.n_layers}), got {len(self.layer_sizes)}")
            for i, (ffn, heads) in enumerate(self.layer_sizes):
                if not 0 < ffn <= self.ffn or not 0 < heads <= self.q_heads or heads % group:
                    raise ValueError(f"layer_sizes[{i}]: expected ffn in [1, {self.ffn}] and heads a multiple of {group} "
                                     f"in [1, {self.q_heads}], got {[ffn, heads]}")
        if not self.mlp_choices:
            self.mlp_choices = [mlp_width_choices(self.layer_ffn(i)) for i in range(self.n_layers)]
        if not self.head_choices:
            self.head_choices = [head_choices(self.layer_heads(i), self.layer_heads(i) // group) for i in range(self.n_layers)]
        for name, choices, full in (("mlp_choices", self.mlp_choices, self.layer_ffn), ("head_choices", self.head_choices, self.layer_heads)):
            if len(choices) != self.n_layers:
                raise ValueError(f"{name}: expected one list per layer ({self.n_layers}), got {len(choices)}")
            for i, layer in enumerate(choices):
                if list(layer) != sorted(set(layer)) or not layer or layer[-1] != full(i) or layer[0] < 0:
                    raise ValueError(f"{name}[{i}]: expected distinct ascending values ending at {full(i)}, got {layer}")
                if name == "head_choices" and any(h % group for h in layer):
                    raise ValueError(f"head_choices[{i}]: expected multiples of the GQA group {group}, got {layer}")

    def layer_ffn(self, i: int) -> int:
        """Layer ``i``'s full MLP width."""
        return self.layer_sizes[i][0] if self.layer_sizes else self.ffn

    def layer_heads(self, i: int) -> int:
        """Layer ``i``'s full query-head count."""
        return self.layer_sizes[i][1] if self.layer_sizes else self.q_heads

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def layer_window(self, i: int) -> Optional[int]:
        """Layer ``i``'s sliding attention window (None: it attends to every earlier position)."""
        if self.sliding_window is None or (self.window_layers is not None and i not in self.window_layers):
            return None
        return self.sliding_window

    def check_positions(self, count: int, name: str) -> None:
        """A ValueError naming ``name`` when sequences of ``count`` positions are more than
        this model takes (a GPT-2's learned positions)."""
        if self.arch != "llama" and count > self.max_positions:
            raise ValueError(f"{name}: expected at most max_positions={self.max_positions}, got {count}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> "FlextronConfig":
        return cls(**values)
