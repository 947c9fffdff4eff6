"""dif-attention: decoupled side-information fusion (DIF-SR, SIGIR 2022) for any transformer recommender."""
from . import functional
from .aap import AttributePredictor, aap_loss, multi_hot, total_loss
from .attention import DecoupledAttention, KVCache
from .baselines import EarlyFusionAttention, InputFusion
from .embedding import AttributeEmbedding, item_attribute_table
from .encoder import DecoupledEncoder, DecoupledEncoderLayer, FeedForward
from .errors import DIFError
from .functional import ScoreMaps, decoupled_attention, reference_attention
from .fusion import AddFusion, ConcatFusion, Fusion, GateFusion, fold_sources, get_fusion
from .masks import causal_mask, lengths_allowed, lengths_mask, padding_mask

__version__ = "0.1.0"

__all__ = [
    "AddFusion", "AttributeEmbedding", "AttributePredictor", "ConcatFusion", "DIFError", "DecoupledAttention",
    "DecoupledEncoder", "DecoupledEncoderLayer", "EarlyFusionAttention", "FeedForward", "Fusion", "GateFusion",
    "InputFusion", "KVCache", "ScoreMaps", "aap_loss", "causal_mask", "decoupled_attention", "fold_sources",
    "functional",
    "get_fusion", "item_attribute_table", "lengths_allowed", "lengths_mask", "multi_hot", "padding_mask",
    "reference_attention", "total_loss",
]
