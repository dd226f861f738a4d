"""Submit main_pretrain.py to SLURM: one task per GPU, checkpointed and requeued at the time limit or preemption.

    python submitit_pretrain.py --nodes 4 --ngpus 8 --timeout 4320 --partition gpu \
        --model lut_vit_base_patch16 --data_path /datasets/imagenet --batch_size 128 --accum_iter 1 \
        --epochs 1600 --output_dir /shared/out/lut_vit_b

Takes main_pretrain.py's flags plus the SLURM flags of util/submit.py. See PRETRAIN.md ("SLURM").
"""
from util.submit import submit

if __name__ == "__main__":
    submit("main_pretrain")
