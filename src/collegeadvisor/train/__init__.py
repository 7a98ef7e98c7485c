"""LoRA fine-tuning: the recipe, batching, checkpoints."""

from collegeadvisor.train.recipe import train

__all__ = ["train"]
