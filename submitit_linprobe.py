"""Submit main_linprobe.py to SLURM: one task per GPU, requeued at the time limit or preemption.

    python submitit_linprobe.py --nodes 2 --ngpus 8 --timeout 4320 --partition gpu \
        --model vit_base_patch16 --finetune lut_vit_b.pth --data_path /datasets/imagenet \
        --batch_size 512 --accum_iter 2 --dist_eval --output_dir /shared/out/lin_lut_vit_b

Takes main_linprobe.py's flags plus the SLURM flags of util/submit.py. See TRAINING.md ("SLURM").
"""
from util.submit import submit

if __name__ == "__main__":
    submit("main_linprobe")
