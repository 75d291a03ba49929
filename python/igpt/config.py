"""IGPTConfig: the model's hyper-parameters, with the paper's named sizes (sec. 3.3)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

NORMS = ("rms", "layer")
ACTIVATIONS = ("quick_gelu", "gelu")

# name -> (n_layer, n_embd, n_head). iGPT-XL's head count is not given in the paper; 24 heads
# keep the head dim at 128, the largest the attention kernel supports.
SIZES = {
    "igpt-tiny": (4, 128, 4),
    "igpt-s": (24, 512, 8),
    "igpt-m": (36, 1024, 8),
    "igpt-l": (48, 1536, 16),
    "igpt-xl": (60, 3072, 24),
}


@dataclass
class IGPTConfig:
    """Hyper-parameters of an iGPT model (GPT-2 field names).

    n_px: image side; a sequence has n_px * n_px tokens in raster order.
    n_colors: palette size; the vocabulary adds one start-of-sequence id (the last one).
    norm: "rms" (iGPT's and HF ImageGPT's, no bias) or "layer" (LayerNorm).
    activation: "quick_gelu" (x * sigmoid(1.702 x), iGPT's) or "gelu".
    bias: biases in the attention and MLP linear layers (and LayerNorm when norm="layer").
    """

    n_px: int = 32
    n_layer: int = 24
    n_head: int = 8
    n_embd: int = 512
    n_colors: int = 512
    norm: str = "rms"
    activation: str = "quick_gelu"
    bias: bool = True
    eps: float = 1e-5

    def __post_init__(self):
        for name in ("n_px", "n_layer", "n_head", "n_embd", "n_colors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.n_colors > 65535:
            raise ValueError(f"n_colors must be at most 65535, got {self.n_colors}")

    @property
    def vocab_size(self) -> int:
        """Input vocabulary: the n_colors palette ids plus the start-of-sequence id."""
        return self.n_colors + 1

    @property
    def sos_id(self) -> int:
        """The start-of-sequence token id (the last row of ``wte``)."""
        return self.n_colors

    @property
    def n_positions(self) -> int:
        """Sequence length of a whole image."""
        return self.n_px * self.n_px

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> IGPTConfig:
        """A named size ("igpt-tiny", "igpt-s", "igpt-m", "igpt-l", "igpt-xl") plus overrides."""
        if name not in SIZES:
            raise ValueError(f"unknown model name {name!r}; choose one of {list(SIZES)}")
        n_layer, n_embd, n_head = SIZES[name]
        fields = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, **overrides}
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IGPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown IGPTConfig fields {sorted(unknown)}")
        return cls(**d)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path) -> IGPTConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))
