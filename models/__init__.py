"""The network: residual blocks, stacks, ResNet builders, pretrained weights."""

from models import layers as _layers  # noqa: F401  (registers custom layers for load_model)
