"""The network and what travels with it (Keras only): residual blocks, stacks, ResNet builders,
fast layers, pretrained weights, quantization-aware twin, preprocessing, the model bundle."""

from models import layers as _layers  # noqa: F401  (registers custom layers for load_model)
