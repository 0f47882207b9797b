"""Plain PyTorch references: short enough to read as the specification, differentiable, any device."""
