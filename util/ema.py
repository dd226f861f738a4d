"""The LUT teacher: an exponential moving average of the student, with MoCo/BYOL's cosine momentum schedule."""
import math

import torch


def momentum_at(step, total_steps, m0):
    """Teacher momentum after `step` of `total_steps` optimizer steps: m0 at step 0, cosine up to 1 at the end."""
    return 1.0 - (1.0 - m0) * (1.0 + math.cos(math.pi * step / total_steps)) / 2.0


@torch.no_grad()
def update_teacher(teacher, student, m):
    """t <- m * t + (1 - m) * s for every floating tensor (weights and BN running stats); integer buffers are copied.

    `student` must be the unwrapped model (not DDP), with the same state-dict keys as `teacher`."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if t_state.keys() != s_state.keys():
        raise ValueError("teacher and student have different state-dict keys")
    t_float, s_float = [], []
    for k, t in t_state.items():
        s = s_state[k]
        if t.is_floating_point():
            t_float.append(t)
            s_float.append(s)
        else:
            t.copy_(s)
    torch._foreach_lerp_(t_float, s_float, 1.0 - m)
