"""Trainers, one module per stage: pretrain.py (base model), later sft.py, reward.py, rl.py, dpo.py.

Each has `add_arguments(parser)` and `main(args)` for the CLI and a Python function the worker calls; the shared loop
pieces (schedule, DDP, exact resume, progress) are in common.py.
"""
