"""The `pretrain` and `sft` stages over one trainer: the loop, optimisers and schedule, data order,
devices (threads, dtype, compile, torchrun), the training log, and the fine-tuning conversations."""
