"""LoRA fine-tuning: the plan (what a run will do, which check reports on), the recipe, batching, checkpoints."""

from collegeadvisor.train.planner import Plan, Rows, encode, plan
from collegeadvisor.train.recipe import fit, setup, train

__all__ = ["Plan", "Rows", "encode", "fit", "plan", "setup", "train"]
