"""igpt: image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020).

from igpt import IGPT, IGPTConfig
model = IGPT(IGPTConfig.from_name("igpt-s", n_px=32))
logits = model(tokens)            # AR; model(tokens, bert_mask=m) for BERT
feats = model.features(tokens)    # (B, L + 1, d) pooled features of every layer
"""

from igpt.config import IGPTConfig
from igpt.model import IGPT

__all__ = ["IGPT", "IGPTConfig"]
__version__ = "0.1.0"
