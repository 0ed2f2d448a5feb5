"""TorchServe adapter and the session engine it drives."""
