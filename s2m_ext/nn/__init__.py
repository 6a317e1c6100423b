"""Set2Model networks: the model layer, the histogram loss, the baselines and retrieval.

    from s2m_ext.nn import ConvEmbedding, Set2Model, HistogramLoss
    model = Set2Model(ConvEmbedding(dim=64), n_components=2)      # S2M-GMM2
    scores = model(concept, queries)         # (B, N, 1, 28, 28), (B, Q, 1, 28, 28) -> (B, Q)
    loss = HistogramLoss(bins=100)(scores[:, :P], scores[:, P:])

Baselines with the same interface: :class:`AvgModel` (AVG), :class:`NNModel` (NN); any
scorer (:func:`make_scorer`) on any embedding via :class:`ConceptModel`.
"""

from .embedding import ConvEmbedding
from .loss import HistogramLoss, histogram_loss
from .model import AvgModel, ConceptModel, NNModel, Set2Model, build_model, model_from_spec
from .retrieval import average_precision, retrieval_scores
from .scorers import SCORER_NAMES, AvgScorer, GMMScorer, NNScorer, SetScorer, SVMScorer, display_name, make_scorer
from .warm_start import WarmStartCache

__all__ = [
    "AvgModel",
    "AvgScorer",
    "ConceptModel",
    "ConvEmbedding",
    "GMMScorer",
    "HistogramLoss",
    "NNModel",
    "NNScorer",
    "SCORER_NAMES",
    "Set2Model",
    "SetScorer",
    "SVMScorer",
    "WarmStartCache",
    "average_precision",
    "build_model",
    "model_from_spec",
    "display_name",
    "histogram_loss",
    "make_scorer",
    "retrieval_scores",
]
