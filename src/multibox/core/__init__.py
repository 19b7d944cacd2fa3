"""Core maths of the SSD family, independent of models, data and training: box formats, default boxes, matching
and encoding, losses, decoding and NMS."""
