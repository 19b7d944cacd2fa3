"""Weights from other code bases (torchvision, MindSpore) converted into multibox state dicts."""
