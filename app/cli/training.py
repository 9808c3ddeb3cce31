"""`flywheel train …` and `flywheel demo …`: each runs its module's own command line, imported only then."""

import argparse

from app.cli.common import CLIError, group
from app.settings import Settings

# `flywheel train NAME …` runs the trainer module's own command line (its add_arguments + main), imported only then.
TRAINERS = {
    "pretrain": ("ml.train.pretrain", "pretrain a base model on the demo world or your text"),
    "sft": ("ml.train.sft", "supervised fine-tuning on dialogues (assistant tokens only)"),
    "reward": ("ml.train.reward", "train a reward model from rankings and thumbs"),
    "rl": ("ml.train.rl", "RL against a reward model (PPO, GRPO, RLOO) with a KL penalty"),
    "dpo": ("ml.train.dpo", "offline DPO from preference pairs"),
    "kto": ("ml.train.dpo", "offline KTO from thumbs up/down"),
}


def run_module_cli(module_name: str, prog: str, argv: list[str]) -> int:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CLIError(f"{prog} is not available in this version ({exc.name} is missing)") from exc
    parser = argparse.ArgumentParser(prog=prog, description=(module.__doc__ or "").split("\n\n")[0])
    if prog.endswith(" kto"):
        module.add_arguments(parser, algo="kto")
    else:
        module.add_arguments(parser)
    return module.main(parser.parse_args(argv))


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    return run_module_cli(TRAINERS[args.trainer][0], f"flywheel train {args.trainer}", args.rest)


def cmd_demo_experiment(args: argparse.Namespace, settings: Settings) -> int:
    return run_module_cli("ml.demo.experiment", "flywheel demo experiment", args.rest)


def cmd_demo_flywheel(args: argparse.Namespace, settings: Settings) -> int:
    return run_module_cli("app.cli.demo_flywheel", "flywheel demo flywheel", args.rest)


def register(groups) -> None:
    train = groups.add_parser("train", help="train models from the command line", description="train models")
    trainers = train.add_subparsers(dest="trainer", required=True, metavar="STAGE")
    for name, (_, help_text) in TRAINERS.items():
        stage = trainers.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        stage.add_argument("rest", nargs=argparse.REMAINDER)
        stage.set_defaults(handler=cmd_train)

    demo_cmds = group(groups, "demo", "the built-in demo world")
    experiment = demo_cmds.add_parser(
        "experiment", help="the whole pipeline on the demo world, with numbers", add_help=False, prefix_chars="\0"
    )
    experiment.add_argument("rest", nargs=argparse.REMAINDER)
    experiment.set_defaults(handler=cmd_demo_experiment)
    loop = demo_cmds.add_parser(
        "flywheel", help="turn the loop through HTTP with simulated people", add_help=False, prefix_chars="\0"
    )
    loop.add_argument("rest", nargs=argparse.REMAINDER)
    loop.set_defaults(handler=cmd_demo_flywheel)
