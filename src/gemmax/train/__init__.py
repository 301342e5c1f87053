"""Fine-tuning: data pipeline, losses, optimizers, checkpoints and the trainer."""
