"""The `colab` profile's code path on a CPU: SAM ViT-B architecture (random weights), LoRA everywhere, on-line
augmentation, AMP off (CPU), gradient checkpointing on, at 64 px instead of 256 so that it takes seconds.

Gradient checkpointing used to be gated on ``h.requires_grad``, which is False for an input that comes from the
frozen patch embedding, so it never turned on. Here it is switched on by the teacher's own
``_enable_grad_checkpointing`` and must really lower what autograd keeps for the backward pass.
"""

from __future__ import annotations

import pytest
import torch

from tskd_utils import teacher
from tskd_utils.models import SamViTEncoder
from tskd_utils.run import setup_run
from tskd_utils.training import Stage

pytestmark = pytest.mark.trains  # every test here fits a model (make test-fast leaves them out)

SIZE = 64  # teacher and student input instead of the profile's 256 (SAM's 14x14 attention windows: 64 px costs
#           as much as 224 px, the smallest input the architecture really saves on)


def _colab_run(tmp_path, toy_root):
    overrides = {"teacher.input_size": SIZE, "data.image_size": SIZE, "data.num_workers": 0, "data.max_val": 2,
                 "teacher.epochs": 1, "teacher.batch_size": 2, "teacher.warmup_epochs": 0}
    return setup_run(tmp_path / "run", "colab", "toy", toy_root, n_labeled=2, seed=0, overrides=overrides)


def _saved_bytes(model, batch) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors autograd saves for the backward pass during one forward + loss, and the loss."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = teacher.lora_loss(model, batch)
    return total[0], loss


def test_colab_profile_trains_sam_vit_b_with_gradient_checkpointing_on_cpu(tmp_path, toy_root):
    run = _colab_run(tmp_path, toy_root)
    t = run.profile.teacher
    assert (t.name, t.cache_prefix, t.lora_stages, t.grad_checkpointing, t.amp) == ("sam_vit_b", False, None, True, True)
    assert run.device == "cpu"  # so autocast and the GradScaler are pass-throughs (AMP is CUDA only)

    encoder = teacher.freeze(teacher.build_encoder(run, pretrained=False))  # SAM ViT-B, random weights
    assert isinstance(encoder, SamViTEncoder) and type(encoder.vit).__name__ == "VisionTransformerSAM"
    assert (len(encoder.vit.blocks), encoder.vit.embed_dim, encoder.embed_dim) == (12, 768, 256)
    peft_model = teacher.add_lora(run, encoder)
    lora_encoder = peft_model.get_base_model()
    model = teacher.TeacherSegmenter(lora_encoder, run.info.n_classes, t.head_channels, t.head)
    base_before = {n: p.detach().clone() for n, p in lora_encoder.named_parameters() if "lora_" not in n}

    data = teacher.teacher_data(run, encoder)
    assert data.train_prefix is None  # GPU profiles run the whole encoder, augmenting on line
    batch = teacher.make_batch(data.val, None, [0], run.device)
    with torch.no_grad():  # the blocks' input comes from frozen layers: what defeated the old gate
        assert not encoder.prefix(encoder.preprocess(batch["image"], batch["valid"])).requires_grad

    model.train()
    torch.manual_seed(0)  # the same LoRA dropout masks in both passes
    plain, loss = _saved_bytes(model, batch)
    loss.backward()
    teacher._enable_grad_checkpointing(lora_encoder)  # what teacher.lora_training calls for this profile on a GPU
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    checkpointed, loss_ckpt = _saved_bytes(model, batch)
    loss_ckpt.backward()
    assert torch.allclose(loss, loss_ckpt)  # the same function, only fewer activations kept
    print(f"saved for backward: {plain / 2**20:.1f} MB plain, {checkpointed / 2**20:.1f} MB checkpointed")
    assert checkpointed < 0.5 * plain, f"checkpointing is not active: {checkpointed} vs {plain} bytes saved"
    grads = [p.grad for n, p in lora_encoder.named_parameters() if "lora_B" in n]
    assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads)  # every block's adapter learns

    # one real training step of the teacher's loop (one epoch of two labeled cases, batch 2), checkpointing on
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel() * x.element_size()) or x,
                                                  lambda x: x):
        history = teacher.fit_lora(teacher.lora_loop(run, peft_model, model, data,
                                                     Stage(tmp_path / "lora", {"test": "colab profile"},
                                                           desc="colab LoRA")))
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"])) and 0 <= history[0]["val_dice"] <= 1
    assert sum(sizes) < plain  # the training step (two images) keeps less than one image without checkpointing
    after = dict(lora_encoder.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())  # pretrained weights untouched
    assert any(p.abs().sum() > 0 for n, p in after.items() if "lora_B" in n)  # LoRA B left zero: it trained
