"""main_finetune.py / main_linprobe.py / main_knn.py with a micro ViT whose encoder matches tests/micro_pretrain.py's.

Usage: python tests/micro_finetune.py {finetune,linprobe,knn} [flags of that script]   (also under torchrun)
KILL_AT=before|after:<file name>:<n> in the environment: SIGKILL at that file event (tests/runs.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_finetune  # noqa: E402
import main_knn  # noqa: E402
import main_linprobe  # noqa: E402
import models_vit  # noqa: E402

MICRO = dict(embed_dim=32, depth=2, num_heads=2)
models_vit.MODELS["vit_micro"] = lambda **kw: models_vit.vit_tiny_patch16(**{**MICRO, **kw})
SCRIPTS = {"finetune": main_finetune, "linprobe": main_linprobe, "knn": main_knn}

if __name__ == "__main__":
    if os.environ.get("KILL_AT"):
        from tests.runs import install_kill_point
        install_kill_point(os.environ["KILL_AT"])
    script = SCRIPTS[sys.argv.pop(1)]
    parser = argparse.ArgumentParser(parents=[script.get_args_parser()])
    script.main(parser.parse_args())
