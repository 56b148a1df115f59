"""The `evaluate` module lives in ``mean_iou.py`` (``evaluate.load`` reads the file named after its folder)."""
