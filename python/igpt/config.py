"""IGPTConfig: the model's hyper-parameters, with the paper's named sizes (sec. 3.3)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass

# One definition each, shared with the kernels. MAX_COLORS (65536) is the palette limit:
# palette ids 0..65535 fit igpt.data's uint16 token caches, and the start-of-sequence id,
# n_colors, is never stored there (the model prepends it), so it may be 65536.
from igpt_kernels.reference import ACTIVATIONS, MAX_COLORS, NORMS

__all__ = ["ACTIVATIONS", "MAX_COLORS", "NORMS", "SIZES", "IGPTConfig"]

# name -> (n_layer, n_embd, n_head). iGPT-XL's head count is not given in the paper; 24 heads
# keep the head dim at 128, the largest the Triton attention kernel takes (the reference and
# SDPA take any head dim, so other sizes run too).
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
    n_colors: palette size, 1..MAX_COLORS (65536); the vocabulary adds one
        start-of-sequence id (the last one, n_colors).
    norm: "rms" (iGPT's and HF ImageGPT's, no bias) or "layer" (LayerNorm).
    activation: "quick_gelu" (x * sigmoid(1.702 x), iGPT's) or "gelu".
    bias: biases in the attention and MLP linear layers (and LayerNorm when norm="layer").
    eps: the norms' epsilon, finite and > 0.

    Every field is type-checked: a wrong type is a TypeError, a bad value a ValueError.
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
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name} must be a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))  # numpy ints become plain ints (JSON, hashing)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_colors > MAX_COLORS:
            raise ValueError(f"n_colors must be at most {MAX_COLORS}, got {self.n_colors}")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be True or False, got {self.bias!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool):
            raise TypeError(f"eps must be a positive number, got {self.eps!r}")
        if not 0 < self.eps < math.inf:  # also refuses NaN
            raise ValueError(f"eps must be finite and > 0, got {self.eps!r}")
        self.eps = float(self.eps)

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
        """n_embd // n_head; any value (only the Triton attention kernel has a list)."""
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
        """The fields as a JSON-ready dict (``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IGPTConfig:
        """A config from ``to_dict``'s output; unknown keys are a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown IGPTConfig fields {sorted(unknown)}")
        return cls(**d)

    def save(self, path) -> None:
        """Write the fields to a JSON file."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path) -> IGPTConfig:
        """Read a JSON file written by ``save``."""
        with open(path) as f:
            return cls.from_dict(json.load(f))
