"""Flax models: [0,1] NHWC in, normalisation inside, explicit BN mode, float32 logits out."""

from hamjax.models.api import (
    BN_MODES,
    apply_model,
    build_model,
    default_model_config,
    eval_model,
    init_variables,
    make_logits_fn,
    model_names,
    register_model,
)
from hamjax.models.fmnist_cnn import FashionMNISTCNN
from hamjax.models.preact_resnet import PreActResNet18
from hamjax.models.small_cnn import SmallCNN
from hamjax.models.wide_resnet import WideResNet

__all__ = [
    "BN_MODES",
    "FashionMNISTCNN",
    "PreActResNet18",
    "SmallCNN",
    "WideResNet",
    "apply_model",
    "build_model",
    "default_model_config",
    "eval_model",
    "init_variables",
    "make_logits_fn",
    "model_names",
    "register_model",
]
