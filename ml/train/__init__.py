"""Trainers, one module per stage: pretrain.py (base model), sft.py, reward.py, rl.py, dpo.py (DPO and KTO).

Each has one shape: a config dataclass that inherits the shared flags (common.TrainConfig, or LoopTrainConfig for the
stages that run common.train_loop), `train(config, on_progress)` that the worker and the demo call, and
`add_arguments(parser)` and `main(args)` for the CLI (`python -m ml.train.NAME`, `flywheel train NAME`), both built on
common.py; the shared loop pieces (schedule, DDP, exact resume, progress) are in common.py too.
"""
