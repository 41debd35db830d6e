"""Training: the `train` stage's loop and its parts.

config.py       TrainConfig (params `train:`), which keys are bookkeeping (don't block resuming)
optim.py        AdamW parameter groups, cosine / warmup-stable-decay schedules
device.py       device auto-selection, mixed precision (bf16 autocast, fp16 + GradScaler), seeding
step.py         one optimizer step with gradient accumulation, clipping, non-finite detection; validation loss
checkpoints.py  atomic safetensors checkpoints (weights, optimizer, RNG) + JSON state, keep-last-K + best
distributed.py  torchrun / DDP process group (gloo on CPU, NCCL on GPU)
metrics.py      FLOPs/token, MFU, DVCLive logger
loop.py         `train(...)`: resume-or-start, the loop, periodic validation, checkpoints
export.py       the trained model directory other stages and tools load (weights, config, tokenizer, lineage)
"""
