"""deepres: deep residual learning (He, Zhang, Ren, Sun, CVPR 2016) on PyTorch."""

from deepres.inference import Classifier, load
from deepres.models import create_model, list_models, model_stats

__all__ = ["Classifier", "create_model", "list_models", "load", "model_stats"]
__version__ = "0.1.0"
