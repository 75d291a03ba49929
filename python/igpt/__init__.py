"""igpt: image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020).

from igpt import IGPT, IGPTConfig
model = IGPT(IGPTConfig.from_name("igpt-s", n_px=32))
logits = model(tokens)            # AR; model(tokens, bert_mask=m) for BERT
feats = model.features(tokens)    # (B, L + 1, d) pooled features of every layer
"""

from igpt.config import IGPTConfig
from igpt.model import IGPT
from igpt_kernels import __version__ as __version__  # written in igpt_kernels/_version.py

__all__ = ["IGPT", "IGPTConfig"]
