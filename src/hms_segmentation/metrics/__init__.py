"""Local `evaluate` modules: ``evaluate.load(str(path_to_this_folder / "mean_iou"))`` works without the Hub."""
