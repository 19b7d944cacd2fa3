"""Using a trained detector: :class:`~multibox.inference.detector.Detector` (PyTorch), the onnxruntime detector,
prediction on images, folders and videos."""
