"""Self-supervised pretraining baselines for the student: masked image modelling and MoCo v3 (compact versions).

Both work on the student's own encoder. They are written out here (about 150 lines)
rather than taken from the ``lightly`` package, whose building blocks would fit but pull in
PyTorch Lightning and Hydra for a few dozen lines of logic; their invariants are tested instead
(the masking keeps the stated ratio; the momentum encoder gets no gradients and moves by the EMA rule).

* MAE (He et al., 2022): mask a high ratio of patches, encode the visible ones, reconstruct the
  pixels of the masked ones with a light transformer decoder; loss = MSE on per-patch normalised
  pixels of masked patches.
* Masked image modelling for a U-Net student (SimMIM, Xie et al., 2022, as SparK and ConvNeXt V2 do for
  convolutional networks): the image is cut into square patches (16 per side), a ratio of them is replaced by a
  learned mask value, the whole student (encoder and decoder) sees the masked image, and a 1x1 convolution on its
  last decoder map reconstructs the pixels; loss = MSE on per-patch normalised pixels of the masked patches, as
  MAE's. :func:`build_mim` picks MAE for a ViT student and this for a U-Net student (method ``mae`` either way).
* MoCo v3 (Chen et al., 2021): two augmented views, a query encoder (backbone + projection MLP +
  prediction MLP) and a momentum key encoder (backbone + projection MLP, EMA of the query one);
  symmetric InfoNCE with temperature tau, scaled by 2 tau as in the paper.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import UNetStudent


def random_masking(n_batch: int, n_tokens: int, ratio: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random masking: (ids_keep (B, n_keep), mask (B, N) with 1 = masked)."""
    n_keep = max(1, int(round(n_tokens * (1 - ratio))))
    noise = torch.rand(n_batch, n_tokens, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(n_batch, n_tokens, device=device)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep, mask


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class MaskedUNet(nn.Module):
    """SimMIM-style masked image modelling for a :class:`~tskd_utils.models.UNetStudent` (see the module text)."""

    def __init__(self, student, mask_ratio: float = 0.6, patches_per_side: int = 16):
        super().__init__()
        self.student, self.mask_ratio = student, mask_ratio
        self.patch = max(1, student.image_size // patches_per_side)
        self.mask_value = nn.Parameter(torch.zeros(1))  # in the student's normalised input space
        self.reconstruct = nn.Conv2d(student.last_channels, 1, 1)

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, reconstruction (B, 1, H, W), pixel mask (B, 1, H, W) with 1 = masked)."""
        b, _, h, w = x01.shape
        p = self.patch
        n = (h // p) * (w // p)
        _, mask = random_masking(b, n, self.mask_ratio, x01.device)
        pix = mask.view(b, 1, h // p, w // p).repeat_interleave(p, 2).repeat_interleave(p, 3)
        s = self.student
        x = s.normalize(x01)
        x = x * (1 - pix) + self.mask_value.to(x.dtype) * pix
        recon = self.reconstruct(s.decode(s.encoder(x))[1])
        target = patchify(x01, p)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()  # per-patch normalised pixels (MAE's norm_pix_loss)
        per_patch = ((patchify(recon.float(), p) - target) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, recon, pix


def build_mim(student, mask_ratio: float, decoder_dim: int, decoder_depth: int) -> nn.Module:
    """The ``mae`` method's wrapper for this kind of student: MAE (ViT) or SimMIM-style :class:`MaskedUNet`."""
    if isinstance(student, UNetStudent):
        return MaskedUNet(student, mask_ratio)
    return MAE(student, mask_ratio, decoder_dim, decoder_depth)


class MAE(nn.Module):
    def __init__(self, student, mask_ratio: float = 0.75, decoder_dim: int = 96, decoder_depth: int = 1):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.student, self.mask_ratio = student, mask_ratio
        enc = student.encoder
        n_tokens = student.grid ** 2
        self.decoder_embed = nn.Linear(student.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n_tokens, decoder_dim))
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        heads = max(1, decoder_dim // 32)
        self.decoder = nn.Sequential(*[Block(decoder_dim, heads, mlp_ratio=4.0) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, student.patch ** 2 * enc.patch_embed.proj.in_channels)

    def encode_visible(self, x01: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        enc = self.student.encoder  # timm ViT with a class token and a position embedding covering it
        npt = enc.num_prefix_tokens
        x = enc.patch_embed(self.student.normalize(x01)) + enc.pos_embed[:, npt:]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :npt]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = enc.norm(enc.blocks(enc.norm_pre(x)))
        return x[:, npt:]

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, predicted patches (B, N, p*p), mask (B, N))."""
        b = x01.shape[0]
        n = self.student.grid ** 2
        ids_keep, mask = random_masking(b, n, self.mask_ratio, x01.device)
        latent = self.decoder_embed(self.encode_visible(x01, ids_keep))
        full = self.mask_token.to(latent.dtype).expand(b, n, -1).clone()  # under autocast latent is bf16/fp16
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, full.shape[-1]), latent)
        pred = self.decoder_pred(self.decoder_norm(self.decoder(full + self.decoder_pos)))
        target = patchify(x01, self.student.patch)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()  # per-patch normalised pixels (MAE's norm_pix_loss)
        per_patch = ((pred - target) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, pred, mask


def _mlp(dims: list[int], last_bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    def __init__(self, student, dim: int = 64, hidden: int = 256, temperature: float = 0.2):
        super().__init__()
        self.student, self.temperature = student, temperature
        width = getattr(student.encoder, "out_channels", student.embed_dim)  # U-Net: the bottleneck's channels
        self.projector = _mlp([width, hidden, hidden, dim])
        self.predictor = _mlp([dim, hidden, dim], last_bn=False)
        self.momentum_encoder = copy.deepcopy(student.encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters()):
            p.requires_grad_(False)

    def pooled(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.student.pooled(encoder, x)  # ViT: mean patch token; U-Net: the bottleneck's spatial mean

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.t() / self.temperature
        labels = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        s = self.student
        q1 = self.predictor(self.projector(self.pooled(s.encoder, s.normalize(view1))))
        q2 = self.predictor(self.projector(self.pooled(s.encoder, s.normalize(view2))))
        with torch.no_grad():
            k1 = self.momentum_projector(self.pooled(self.momentum_encoder, s.normalize(view1)))
            k2 = self.momentum_projector(self.pooled(self.momentum_encoder, s.normalize(view2)))
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """EMA rule: key = m * key + (1 - m) * query."""
        pairs = [(self.momentum_encoder, self.student.encoder), (self.momentum_projector, self.projector)]
        for target, online in pairs:
            for pt, po in zip(target.parameters(), online.parameters()):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
            for bt, bo in zip(target.buffers(), online.buffers()):
                bt.copy_(bo)
