"""Training, datasets and evaluation of mmfuse models."""
