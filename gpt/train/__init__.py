"""Training: the `train` stage's loop and its parts.

config.py       TrainConfig (params `train:`), which keys are bookkeeping (don't block resuming)
optim.py        AdamW parameter groups, cosine / warmup-stable-decay schedules
device.py       device auto-selection, mixed precision (bf16 autocast, fp16 + GradScaler), seeding
step.py         one optimizer step with gradient accumulation, clipping, non-finite detection; validation loss
checkpoints.py  the checkpoint directory: atomic safetensors checkpoints (weights, optimizer, RNG) + JSON state
                with file sizes/hashes; verify, set damaged ones aside, keep-last-K + best, other runs under runs/
resume.py       run identity/fingerprint and which checkpoint continues a run (longer max_steps per schedule)
distributed.py  torchrun / DDP process group (gloo on CPU, NCCL on GPU)
metrics.py      FLOPs/token, MFU, DVCLive logger
loop.py         `train(...)`: resume-or-start, the loop, periodic validation, checkpoints, save on SIGINT/SIGTERM
(the trained model directory other stages load is gpt/model_dir.py's)
"""
