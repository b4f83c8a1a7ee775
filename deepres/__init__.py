"""deepres: deep residual learning (He, Zhang, Ren, Sun, CVPR 2016) on PyTorch."""

from deepres.models import create_model, list_models, model_stats

__all__ = ["create_model", "list_models", "model_stats"]
__version__ = "0.1.0"
