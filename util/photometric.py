"""LUT's view-2 photometric chain (util/augment.py, LUTTwoViews) as batched tensor ops on uint8 images [B, 3, H, W].

Each op reproduces the 8-bit arithmetic of the Pillow code torchvision's PIL path calls, with per-sample parameters
as tensors [B], on any device, without a loop over samples or a host sync. The float steps follow the C types of
Pillow's source (float32 where it computes in `float`, float64 where in `double`, truncation where it casts to an
integer): brightness, contrast, saturation, grayscale, solarize, hue and blur match Pillow bit for bit
(tests/test_photometric.py). Run them eagerly: a compiler that contracts a multiply and an add into one FMA (e.g.
Triton under torch.compile) rounds once where Pillow rounds twice, which may move a pixel by one grey level."""
import torch

# Pillow's ITU-R 601-2 luma weights in 16-bit fixed point (Convert.c, rgb2l).
LUMA_WEIGHTS = (19595, 38470, 7471)


def _per_sample(x):
    return x.view(-1, 1, 1, 1)


def _luma(img):
    """PIL convert("L") as int32 [B, 1, H, W]: (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
    r, g, b = img.int().unbind(1)
    return ((r * LUMA_WEIGHTS[0] + g * LUMA_WEIGHTS[1] + b * LUMA_WEIGHTS[2] + 0x8000) >> 16).unsqueeze(1)


def _blend(degenerate, img, factor):
    """Image.blend(degenerate, img, factor) (Blend.c): degenerate + factor * (img - degenerate) in float32, multiply
    then add, clipped to [0, 255] and truncated (for factor in [0, 1] the clip is a no-op, as in Pillow's branch)."""
    degenerate = degenerate.int()
    mixed = degenerate.float() + _per_sample(factor.float()) * (img.int() - degenerate).float()
    return mixed.clamp(0, 255).to(torch.uint8)


def grayscale(img):
    """T.Grayscale(num_output_channels=3): PIL convert("L"), repeated over 3 channels."""
    return _luma(img).to(torch.uint8).expand_as(img).contiguous()


def solarize(img, threshold=128):
    """ImageOps.solarize: levels >= threshold inverted."""
    return torch.where(img >= threshold, 255 - img, img)


def adjust_brightness(img, factor):
    """ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros_like(img), img, factor)


def _contrast_grey(img):
    """ImageEnhance.Contrast's grey level: int(mean of the L image + 0.5), the mean as Python's exact int / int."""
    total = _luma(img).sum((1, 2, 3), dtype=torch.int64)
    return _per_sample((total.double() / (img.shape[-2] * img.shape[-1]) + 0.5).floor())


def adjust_contrast(img, factor):
    """ImageEnhance.Contrast: blend with a uniform grey image of the rounded mean luma."""
    return _blend(_contrast_grey(img), img, factor)


def adjust_saturation(img, factor):
    """ImageEnhance.Color: blend with the L image converted back to RGB."""
    return _blend(_luma(img), img, factor)


def _rgb_to_hsv(img):
    """Convert.c's rgb2hsv (8-bit H, S, V) -> int32 h, s, v [B, H, W]; float/double steps as in the C source."""
    r, g, b = img.int().unbind(1)
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    grey = maxc == minc  # h = s = 0; the clamps below only keep its discarded divisions finite
    cr = (maxc - minc).float().clamp(min=1)
    s = (maxc - minc).float() / maxc.float().clamp(min=1)
    rc, gc, bc = ((maxc - c).float() / cr for c in (r, g, b))
    h = torch.where(r == maxc, (bc - gc).double(),
                    torch.where(g == maxc, 2.0 + rc.double() - bc.double(), 4.0 + gc.double() - rc.double()))
    h = torch.fmod(h.float().double() / 6.0 + 1.0, 1.0).float()  # C stores each h in a float
    h, s = ((c.double() * 255.0).int() for c in (h, s))
    return torch.where(grey, 0, h), torch.where(grey, 0, s), maxc


def _round_half_up(x):
    """C's round() for x >= 0, exactly: the fractional part of a double is exact, x + 0.5 need not be."""
    whole = x.floor()
    return whole + (x - whole >= 0.5)


def _hsv_to_rgb(h, s, v):
    """Convert.c's hsv2rgb -> uint8 [B, 3, H, W]. s = 0 needs no branch: then p = q = t = v."""
    sixths = h.double() * 6.0 / 255.0
    i = sixths.floor()
    f = (sixths - i).float()
    fs = (s.double() / 255.0).float()
    v64 = v.double()
    p = _round_half_up(v64 * (1.0 - fs.double()))
    q = _round_half_up(v64 * (1.0 - (fs * f).double()))  # fs * f is a float product in C
    t = _round_half_up(v64 * (1.0 - fs.double() * (1.0 - f.double())))
    # Red takes v, q, p, p, t, v in sextants 0..5; green and blue follow the same cycle 2 and 4 sextants later
    # (i = 6 only for h = 255, where f = 0: sextant 0). Selected with torch.where: a lookup table would need a copy
    # to the device, a host sync.
    def pick(sextant):
        return torch.where((sextant == 0) | (sextant == 5), v64, torch.where(
            sextant == 1, q, torch.where(sextant == 4, t, p)))
    return torch.stack([pick(i % 6), pick((i - 2) % 6), pick((i - 4) % 6)], 1).to(torch.uint8)


def adjust_hue(img, hue_factor):
    """torchvision's PIL adjust_hue: PIL's 8-bit HSV, H += uint8(int32(hue_factor * 255)) wrapping mod 256, back."""
    h, s, v = _rgb_to_hsv(img)
    shift = (hue_factor.double() * 255).int().view(-1, 1, 1)  # truncation towards zero, as np.int32
    return _hsv_to_rgb(torch.remainder(h + shift, 256), s, v)


def _box_parameters(radius):
    """BoxBlur.c's _gaussian_blur_radius (3 passes) and ImagingHorizontalBoxBlur's fixed-point weights for a float32
    Gaussian radius [B] -> int64 box radius r, weight ww of the 2r + 1 inner pixels and fw of the two edge pixels."""
    sigma2 = radius.float() * radius.float() / 3
    box_length = torch.sqrt(12.0 * sigma2.double() + 1.0).float()
    l = ((box_length.double() - 1.0) / 2.0).floor().float()
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))
    extended = l + a
    r = extended.long()
    ww = (float(1 << 24) / (extended * 2 + 1)).long()
    return r, ww, ((1 << 24) - (2 * r + 1) * ww) // 2


def _box_pass(x, r, ww, fw):
    """One ImagingLineBoxBlur8 pass along the last axis of int32 x with per-sample r, ww, fw: out[j] =
    round((ww * sum(x[j-r .. j+r]) + fw * (x[j-r-1] + x[j+r+1])) / 2**24), indices clamped to the edges. The window
    sum comes from a cumulative sum gathered at per-sample offsets, plus the clamped copies of the edge pixels."""
    width = x.shape[-1]
    lo = torch.arange(width, device=x.device) - _per_sample(r)
    hi = lo + 2 * _per_sample(r)
    at = lambda t, index: t.gather(-1, index.clamp(0, t.shape[-1] - 1).expand(*x.shape[:-1], -1))  # noqa: E731
    cumsum = torch.nn.functional.pad(x.cumsum(-1, dtype=torch.int32), (1, 0))  # cumsum[j] = sum(x[:j])
    inner = at(cumsum, hi + 1) - at(cumsum, lo) + x[..., :1] * (-lo).clamp(min=0).int() + \
        x[..., -1:] * (hi - width + 1).clamp(min=0).int()
    # Pillow's UINT32 sums exceed int32: int64 for the weighted sum only.
    bulk = inner.long() * _per_sample(ww) + (at(x, lo - 1) + at(x, hi + 1)).long() * _per_sample(fw)
    return ((bulk + (1 << 23)) >> 24).int()


def gaussian_blur(img, radius):
    """PIL ImageFilter.GaussianBlur(radius): 3 extended-box passes along rows, then 3 along columns, each rounded to
    8 bits. Radius 0 gives ww = 2**24, fw = 0, the identity (Pillow returns a copy)."""
    r, ww, fw = _box_parameters(radius)
    x = img.int()
    for _ in range(2):  # rows, then columns as the rows of the transposed image, then transposed back
        for _ in range(3):
            x = _box_pass(x, r, ww, fw)
        x = x.transpose(-1, -2)
    return x.to(torch.uint8)


def apply_view2(img, params):
    """LUTTwoViews' view-2 photometric chain after crop and flip, given the parameters the PIL chain draws:

    params: dict of tensors [B] (order [B, 4]): jitter (bool, RandomApply(ColorJitter) taken), order (ColorJitter's
    fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue), brightness, contrast, saturation, hue (the factors),
    choice (OneOf: 0 grayscale, 1 solarize, 2 blur) and radius (the blur's; any value where choice != 2).
    Every branch runs on every sample and torch.where keeps the drawn one. ColorJitter's order puts hue at some
    position k of four: the enhance ops before it (rounds 0-2, each active where it comes before k), then the hue
    shift once, then the enhance ops after it (rounds 1-3, active after k). Each round is one blend, its degenerate
    image picked per sample (black, mean grey or luma). Then grayscale, solarize and blur."""
    order = params["order"]
    hue_at = (order == 3).int().argmax(1)
    factors = torch.stack([params["brightness"], params["contrast"], params["saturation"]], 1)

    def enhance(x, step, active):
        op = _per_sample(order[:, step])
        degenerate = torch.where(op == 0, 0, torch.where(op == 1, _contrast_grey(x).int(), _luma(x)))
        blended = _blend(degenerate, x, factors.gather(1, order[:, step:step + 1].clamp(max=2))[:, 0])
        return torch.where(_per_sample(active), blended, x)

    x = img
    for step in range(3):
        x = enhance(x, step, step < hue_at)
    x = adjust_hue(x, params["hue"])
    for step in range(1, 4):
        x = enhance(x, step, step > hue_at)
    x = torch.where(_per_sample(params["jitter"]), x, img)
    choice = _per_sample(params["choice"])
    return torch.where(choice == 0, grayscale(x), torch.where(choice == 1, solarize(x),
                                                              gaussian_blur(x, params["radius"])))
