"""MAE and LUT pre-training models (docs/method.md, sections 1-3).

`MaskedAutoencoderViT` is plain MAE. `LUT` adds the projector (`head`) and predictor on top of the same encoder and
decoder: the student reconstructs the masked patches of view 1 and predicts, from the visible tokens of each view,
the teacher's embedding of the other, unmasked view (the broader-context loss)."""
from functools import cache, partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, PatchEmbed

from util.pos_embed import get_2d_sincos_pos_embed


def check_mask_ratio(mask_ratio, num_patches=None, num_views=1):
    """n = int(L * (1 - mask_ratio)), the visible patches per view (None without num_patches), or a ValueError naming
    what does not fit: a ratio in (0, 1), at least 1 - 1 / num_views (disjoint visible sets), one visible patch."""
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if mask_ratio < 1 - 1 / num_views:
        raise ValueError(f"mask_ratio >= {1 - 1 / num_views:g} is needed so that the {num_views} views' visible "
                         f"patches are disjoint, got {mask_ratio}")
    n = None if num_patches is None else int(num_patches * (1 - mask_ratio))
    if n is not None and n < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch of {num_patches}")
    return n


def random_masking(noise, mask_ratio, num_views=1):
    """Per-sample random masking from one noise tensor, shared by MAE (1 view) and LUT (2 views).

    noise: [B, L]. With perm = argsort(noise), view v keeps perm[:, v*n:(v+1)*n], n = int(L * (1 - mask_ratio)),
    so the visible sets of different views never overlap.
    Returns (ids_keep, masks, ids_restore): lists of `num_views` tensors [B, n] and [B, L] (1 = removed, 0 = kept,
    original patch order), and ids_restore [B, L] which un-shuffles view 1's tokens for the decoder."""
    B, L = noise.shape
    n = check_mask_ratio(mask_ratio, L, num_views)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep, masks = [], []
    for v in range(num_views):
        keep = ids_shuffle[:, v * n:(v + 1) * n]
        mask = torch.ones(B, L, device=noise.device)
        mask.scatter_(1, keep, 0.0)
        ids_keep.append(keep)
        masks.append(mask)
    return ids_keep, masks, ids_restore


def bc_loss(q1, q2, k1, k2):
    """Broader-context loss: symmetric, cross-view only. q: student predictions, k: teacher targets, all [B, D].

    l(a, b) = 2 - 2 cos(a, b), averaged over the batch; L = (l(q1, sg(k2)) + l(q2, sg(k1))) / 2."""
    def pair(q, k):
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.detach().float(), dim=-1)
        return (2 - 2 * (q * k).sum(dim=-1)).mean()
    return (pair(q1, k2) + pair(q2, k1)) / 2


def lut_loss(mim_loss, bc, w_mae=1.0, w_bc=0.25):
    return w_mae * mim_loss + w_bc * bc


def build_mlp(num_layers, in_dim, mlp_dim, out_dim, norm_layer="BN", act_layer="ReLU"):
    """Projector / predictor: (Linear -> norm -> act) x (num_layers - 1) -> Linear, no biases; 0 layers = identity.

    Plain nn.Sequential so the state-dict indices match the authors' checkpoints (BN: 0 Linear, 1 BN, 2 ReLU,
    3 Linear; no norm: 0 Linear, 1 ReLU, 2 Linear)."""
    if num_layers == 0:
        return nn.Identity()
    norms = {"BN": nn.BatchNorm1d, "LN": nn.LayerNorm, "none": None}
    acts = {"ReLU": nn.ReLU, "GELU": nn.GELU}
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else mlp_dim
        d_out = out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            if norms[norm_layer] is not None:
                layers.append(norms[norm_layer](d_out))
            layers.append(acts[act_layer]())
    return nn.Sequential(*layers)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder (timm blocks, fused SDPA attention) and a lightweight ViT decoder."""

    num_views = 1  # augmented views of each image that forward_train takes
    needs_teacher = False  # whether forward_train takes an EMA teacher's targets

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=False):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_embed.patch_size[0] ** 2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)).float().unsqueeze(0))
        # Initialise the patch projection like a Linear layer on the flattened patch, as MAE does.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def no_weight_decay(self):
        """Besides biases and norms, no weight decay on tokens and position embeddings (docs/method.md, 4)."""
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, imgs):
        """imgs: [B, C, H, W] -> [B, L, p*p*C], each patch flattened in (p, q, c) order."""
        p = self.patch_embed.patch_size[0]
        B, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(B, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(B, h * w, p * p * C)

    def unpatchify(self, x):
        """x: [B, L, p*p*C] -> imgs [B, C, H, W] (inverse of `patchify`)."""
        p = self.patch_embed.patch_size[0]
        h, w = self.patch_embed.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, self.in_chans)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], self.in_chans, h * p, w * p)

    def forward_encoder(self, imgs, ids_keep=None):
        """imgs: [B, C, H, W]; ids_keep: [B, n] visible patches (None = all L). Returns [B, 1 + n, D], CLS first."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent, ids_restore):
        """latent: [B, 1 + n, D] (the first n of the shuffle visible); ids_restore: [B, L]. Returns [B, L, p*p*C]."""
        x = self.decoder_embed(latent)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error on the removed patches only. imgs: [B, C, H, W]; pred: [B, L, p*p*C]; mask: [B, L]."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def draw_noise(self, imgs, noise=None):
        if noise is None:
            return torch.rand(imgs.shape[0], self.num_patches, device=imgs.device)
        if noise.shape != (imgs.shape[0], self.num_patches):
            raise ValueError(f"noise must be [B, L] = [{imgs.shape[0]}, {self.num_patches}], got {list(noise.shape)}")
        return noise

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs: [B, C, H, W]; noise: optional [B, L]. Returns (loss, pred [B, L, p*p*C], mask [B, L])."""
        (ids_keep,), (mask,), ids_restore = random_masking(self.draw_noise(imgs, noise), mask_ratio)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_train(self, views, mask_ratio=0.75, noise=None, targets=None):
        """views: [imgs [B, C, H, W]]; targets: None. Returns dict(loss): what is back-propagated (and logged)."""
        loss, _, _ = self(*views, mask_ratio=mask_ratio, noise=noise)
        return dict(loss=loss)


class LUT(MaskedAutoencoderViT):
    """LUT: MAE plus a projector (`head`) and predictor trained against an EMA teacher's view of the whole image.
    w_mae, w_bc: the weights of the reconstruction and broader-context losses in forward_train."""

    num_views = 2
    needs_teacher = True

    def __init__(self, depth_head=2, depth_pred=2, head_mlp_dim=4096, head_norm_layer="BN", head_act_layer="ReLU",
                 w_mae=1.0, w_bc=0.25, **kwargs):
        super().__init__(**kwargs)
        self.w_mae, self.w_bc = w_mae, w_bc
        dim = self.pos_embed.shape[-1]
        self.head = build_mlp(depth_head, dim, head_mlp_dim, dim, head_norm_layer, head_act_layer)
        self.predictor = build_mlp(depth_pred, dim, head_mlp_dim, dim, head_norm_layer, head_act_layer)
        self.head.apply(self._init_weights)
        self.predictor.apply(self._init_weights)

    def forward_student(self, imgs1, imgs2, mask_ratio=0.75, noise=None):
        """Student path on two views of the same images, imgs1/imgs2: [B, C, H, W]; noise: optional [B, L].

        Returns a dict: mim_loss (reconstruction of view 1), q1 / q2 [B, D] (predictor outputs of each view),
        pred [B, L, p*p*C] (view 1), mask1 / mask2 [B, L] (1 = removed)."""
        (keep1, keep2), (mask1, mask2), ids_restore = random_masking(self.draw_noise(imgs1, noise), mask_ratio, 2)
        # One encoder call for both views: every op is per-sample, so this equals two calls.
        latent1, latent2 = self.forward_encoder(torch.cat([imgs1, imgs2]), torch.cat([keep1, keep2])).chunk(2)
        pred = self.forward_decoder(latent1, ids_restore)
        # The heads run once per view so BatchNorm normalises each view with its own statistics.
        q1 = self.predictor(self.head(latent1[:, 1:, :].mean(dim=1)))
        q2 = self.predictor(self.head(latent2[:, 1:, :].mean(dim=1)))
        return dict(mim_loss=self.forward_loss(imgs1, pred, mask1), q1=q1, q2=q2, pred=pred,
                    mask1=mask1, mask2=mask2)

    forward = forward_student

    def forward_train(self, views, mask_ratio=0.75, noise=None, targets=None):
        """views: [view1, view2]; targets: the teacher's forward_teacher(*views). Returns dict(loss, mim, bc)."""
        out = self.forward_student(*views, mask_ratio=mask_ratio, noise=noise)
        bc = bc_loss(out["q1"], out["q2"], *targets)
        return dict(loss=lut_loss(out["mim_loss"], bc, self.w_mae, self.w_bc), mim=out["mim_loss"], bc=bc)

    @torch.no_grad()
    def forward_teacher(self, imgs1, imgs2):
        """Teacher path (the EMA copy, in eval mode): both views unmasked, projector only. Returns k1, k2: [B, D]."""
        if self.training:
            raise RuntimeError("forward_teacher needs eval mode: the teacher's BatchNorm uses running statistics")
        latent = self.forward_encoder(torch.cat([imgs1, imgs2]))
        return self.head(latent[:, 1:, :].mean(dim=1)).chunk(2)


ENCODERS = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
# Our own choice for the tiny size (no published recipe): a lighter decoder so CPU demos and tests stay fast.
TINY_DECODER = dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)


def _factory(cls, size):
    def build(**kwargs):
        decoder = TINY_DECODER if size == "tiny" else DECODER
        return cls(**{"patch_size": 16, **ENCODERS[size], **decoder, **kwargs})
    build.__doc__ = f"{cls.__name__} with a ViT-{size} encoder; keyword arguments override any default."
    return build


mae_vit_tiny_patch16 = _factory(MaskedAutoencoderViT, "tiny")
mae_vit_small_patch16 = _factory(MaskedAutoencoderViT, "small")
mae_vit_base_patch16 = _factory(MaskedAutoencoderViT, "base")
mae_vit_large_patch16 = _factory(MaskedAutoencoderViT, "large")
lut_vit_tiny_patch16 = _factory(LUT, "tiny")
lut_vit_small_patch16 = _factory(LUT, "small")
lut_vit_base_patch16 = _factory(LUT, "base")
lut_vit_large_patch16 = _factory(LUT, "large")

MODELS = {f"{kind}_vit_{size}_patch16": globals()[f"{kind}_vit_{size}_patch16"]
          for kind in ("mae", "lut") for size in ENCODERS}


@cache
def model_class(name):
    """The class of MODELS[name] (its num_views, needs_teacher), from a build on the meta device: no weights."""
    with torch.device("meta"):
        return type(MODELS[name]())
