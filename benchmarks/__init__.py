"""One script per figure the project claims; run each as a module: `python -m benchmarks.<name>`."""
