"""Examples for dif-attention: data, models, training and the entry points (see examples/README.md)."""
