"""What runs a model: torch (resnetkit's own fast path), ONNX Runtime and OpenVINO. Each
module is the only one that talks to its engine; infer.runner chooses among them."""
