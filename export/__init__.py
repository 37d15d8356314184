"""Distillation, structured pruning, ONNX export, INT8 quantization and the verified bundle."""
