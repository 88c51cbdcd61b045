"""The `fractal` command: one entry point over the model, service and loadtest packages."""
