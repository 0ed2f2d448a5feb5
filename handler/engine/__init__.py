"""Session engine: model, image features, per-session history, session store. Knows nothing of TorchServe or HTTP."""
