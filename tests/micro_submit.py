"""submitit_pretrain.py for the micro models of micro_pretrain.py; the SLURM tests submit through it.

Usage, from the repository root: python -m tests.micro_submit [main_pretrain flags] [SLURM flags]
The job imports this module too, which registers the micro models there.
"""
import tests.micro_pretrain  # noqa: F401  (registers lut_vit_micro / mae_vit_micro)
from main_pretrain import get_args_parser, main  # noqa: F401  (what util.submit runs)
from util.submit import submit

if __name__ == "__main__":
    submit("tests.micro_submit")
