"""Fixed 2-D sin-cos position embeddings (MAE convention, so released checkpoints line up)."""
import numpy as np


def get_1d_sincos_pos_embed(embed_dim, pos):
    """pos: positions of any shape -> [pos.size, embed_dim], first half sin, second half cos."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Sin-cos embedding of a (gh, gw) patch grid, row-major like the patch sequence.

    Returns [gh * gw, embed_dim], or [1 + gh * gw, embed_dim] with a leading zero row for the CLS token.
    Half of the channels encode the column (x) coordinate, half the row (y) coordinate, in that order."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32), indexing="ij")
    emb = np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, xs),
                          get_1d_sincos_pos_embed(embed_dim // 2, ys)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb
