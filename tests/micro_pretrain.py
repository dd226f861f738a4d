"""main_pretrain.py with two extra micro-sized models, for tests (also under torchrun).

Usage: python tests/micro_pretrain.py [main_pretrain flags] [--dump_weights]
--dump_weights makes every rank write its final student state dict to output_dir/rank<r>.pth.
KILL_AT=before|after:<file name>:<n> in the environment: SIGKILL at that file event (tests/runs.py).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_pretrain  # noqa: E402
import models_lut  # noqa: E402

MICRO = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
models_lut.MODELS["lut_vit_micro"] = lambda **kw: models_lut.LUT(**{**MICRO, **kw})
models_lut.MODELS["mae_vit_micro"] = lambda **kw: models_lut.MaskedAutoencoderViT(**{**MICRO, **kw})

if __name__ == "__main__":
    if os.environ.get("KILL_AT"):
        from tests.runs import install_kill_point
        install_kill_point(os.environ["KILL_AT"])
    parser = argparse.ArgumentParser(parents=[main_pretrain.get_args_parser()])
    parser.add_argument("--dump_weights", action="store_true")
    args = parser.parse_args()
    student, _ = main_pretrain.main(args)
    if args.dump_weights and student is not None:
        torch.save(student.state_dict(), os.path.join(args.output_dir, f"rank{args.rank}.pth"))
