"""Domain packages: datasets, prompts, transforms and recipes per field; never a training loop."""
