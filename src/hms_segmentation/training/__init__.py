"""Training entry points: the `Trainer` script (`train`), the explicit Accelerate loop (`train_accelerate`) and the
CPU `quickstart` on the embedded synthetic dataset. They import the model; the model never imports them."""
