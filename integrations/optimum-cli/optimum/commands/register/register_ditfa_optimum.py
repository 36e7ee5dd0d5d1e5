"""``optimum-cli ditfa ...``: ditfa-optimum's command line inside Optimum's.

Optimum's CLI loads every ``REGISTER_COMMANDS`` list it finds in the ``optimum.commands.register`` namespace (PEP 420:
no ``__init__.py`` on the way), as optimum-onnx and optimum-quanto register theirs. This file is that namespace's
ditfa-optimum part; it imports nothing heavy until the command runs, so ``optimum-cli --help`` stays fast.

    optimum-cli ditfa optimize mini-mmdit --out my-artifact
    optimum-cli ditfa export onnx my-artifact my-onnx
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class DiTFastAttnCommand(BaseOptimumCLICommand):
    """The same subcommands and options as ``ditfa-optimum`` (`ditfa_optimum.cli.add_commands`)."""

    COMMAND = CommandInfo(name="ditfa", help="DiTFastAttnV2 plans for diffusion transformers (ditfa-optimum): "
                                             "optimize, generate, export onnx, inspect, verify, push")

    @staticmethod
    def parse_args(parser):
        from ditfa_optimum.cli import add_commands

        add_commands(parser)

    def run(self):
        import sys

        from ditfa_optimum.cli import run_command

        status = run_command(self.args)
        if status:
            sys.exit(status)


REGISTER_COMMANDS = [DiTFastAttnCommand]
