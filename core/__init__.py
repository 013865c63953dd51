"""domainclip core: backbones, data, losses, the training loop, evaluation and the CLI."""
