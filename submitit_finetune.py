"""Submit main_finetune.py to SLURM (its flags plus util/submit.py's): one task per GPU, requeued at the time limit or
preemption. TRAINING.md ("SLURM") shows the command."""
from util.submit import submit

if __name__ == "__main__":
    submit("main_finetune")
