"""llava-sessions: stateful multi-turn LLaVA on TorchServe and SageMaker."""
__version__ = "0.1.0"
