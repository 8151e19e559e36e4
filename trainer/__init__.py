"""World models on store tokens: models, losses, data windows, the training loop, eval."""
