"""Exporting a trained detector (ONNX with decoding and NMS in the graph)."""

# Plain values, no torch: ``multibox export``'s parser shows them as its defaults and choices.
OPSET = 17         # the TorchScript exporter's opset
DYNAMO_OPSET = 18  # the dynamo exporter's (its lowest: torch's ONNX functions are written for 18)
DEFAULT_MAX_DETECTIONS = 100   # COCO's maxDets: K when neither --max-det nor eval.max_per_image says
INPUT_DTYPE_NAMES = ("float32", "uint8")   # the graph's input dtypes (multibox.export.onnx.INPUT_DTYPES)
EXPORTER_NAMES = ("dynamo", "torchscript")   # torch.onnx.export(dynamo=True / False); see multibox.export.onnx
DEFAULT_CALIB_IMAGES = 64      # INT8 calibration images (see multibox.export.quantize)
MAX_RELATIVE_AP_DROP = 0.01    # the INT8 accuracy gate: at most 1 % of the float model's AP lost
