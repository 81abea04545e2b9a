"""Training: DeepSpeed ZeRO on Ray Train workers over prepared shards; export to a Hugging Face dir.

trainer.py (the driver: `bigray train`), loop.py (the per-worker function), batches.py (the replayable
data order), zero.py (DeepSpeed config, param groups, LR schedule), model.py (presets, FLOPs),
metrics.py (MFU, metrics.jsonl, TensorBoard, loss.png), export.py (ZeRO checkpoint -> HF dir),
lora.py (peft LoRA adapters: wrapping, checks, merge and adapter export).
"""
