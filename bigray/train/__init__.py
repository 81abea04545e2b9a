"""Training: DeepSpeed ZeRO on Ray Train workers over prepared shards; export to a Hugging Face dir."""

from bigray.train.export import export, latest_checkpoint
from bigray.train.trainer import train

__all__ = ["export", "latest_checkpoint", "train"]
