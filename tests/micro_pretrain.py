"""main_pretrain.py with two extra micro-sized models, for tests (also under torchrun).

Usage: python tests/micro_pretrain.py [main_pretrain flags] [--dump_weights] [--count_syncs]
--dump_weights makes every rank write its final student state dict to output_dir/rank<r>.pth.
--count_syncs makes every rank write the host syncs of its training epochs to output_dir/syncs-rank<r>.json: a list
of [op, Python stack] (tests/syncs.py).
KILL_AT=before|after:<file name>:<n> in the environment: SIGKILL at that file event (tests/runs.py).
"""
import argparse
import json
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
    parser.add_argument("--count_syncs", action="store_true")
    args = parser.parse_args()
    if args.count_syncs:
        from tests.syncs import SyncCounter
        counter, train_one_epoch = SyncCounter(), main_pretrain.train_one_epoch

        def counted(*a, **kw):
            with counter:
                return train_one_epoch(*a, **kw)
        main_pretrain.train_one_epoch = counted
    student, _ = main_pretrain.main(args)
    if args.dump_weights and student is not None:
        torch.save(student.state_dict(), os.path.join(args.output_dir, f"rank{args.rank}.pth"))
    if args.count_syncs and student is not None:
        with open(os.path.join(args.output_dir, f"syncs-rank{args.rank}.json"), "w") as f:
            json.dump(counter.syncs, f)
