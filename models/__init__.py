"""The network: residual blocks, stacks, ResNet builders, pretrained weights."""
