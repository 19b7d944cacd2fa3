"""``multibox bench``: speed against torchvision's ``ssd300_vgg16`` in the same process (SPEC §5)."""

# The bench's lines (multibox.bench.suite), here without torch: ``multibox bench --help`` lists them.
LINES = ("train_step", "train_e2e", "infer_e2e", "augment", "eval", "data")
