"""``multibox bench``: speed against torchvision's ``ssd300_vgg16`` (or the arch's torchvision twin) in the same
process (SPEC §5)."""

# The bench's lines (multibox.bench.suite), here without torch: ``multibox bench --help`` lists them.
LINES = ("train_step", "train_e2e", "infer_e2e", "infer_jpeg", "augment", "eval", "data")
# The backends of ``multibox bench --backends`` (multibox.bench.backends).
BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-int8")
