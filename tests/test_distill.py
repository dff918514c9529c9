"""distill_lab.distill: the loss against independent float64 formulas, cached top-k logits, the
trainer (determinism, accumulation, kill-and-resume, 2-process DDP), hidden-state and sequence KD."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill_lab.distill import (DistillationLoss, DistillationTrainer, HiddenStateLoss, TeacherCache,
                                 TopKLogits, TrainConfig, cache_teacher_logits,
                                 generate_distillation_data, lr_factor, shift_labels, topk_fidelity)
from distill_lab.models import tiny_llama

WORKER = Path(__file__).with_name("distill_worker.py")


# ----------------------------------------------------------------- independent float64 reference


def reference_loss(student, teacher, labels, T, alpha, kind="forward_kl", beta=0.5):
    """The formula of the issue, written out in float64 with plain probabilities (no log-space tricks)."""
    s, t = student.double(), teacher.double()
    keep = labels != -100
    p = torch.softmax(s / T, -1)[keep]  # (n, V) student at temperature T
    q = torch.softmax(t / T, -1)[keep]  # (n, V) teacher at temperature T

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        d = kl(q, p)
    elif kind == "reverse_kl":
        d = kl(p, q)
    else:
        m = beta * q + (1 - beta) * p
        d = beta * kl(q, m) + (1 - beta) * kl(p, m)
    ce = F.cross_entropy(s[keep], labels[keep], reduction="mean")
    return alpha * T ** 2 * d.mean() + (1 - alpha) * ce


def random_case(B=3, T=7, V=50, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * scale
    teacher = torch.randn(B, T, V, generator=g) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # padding / prompt positions
    labels[:, -1] = -100  # the last position has no next token
    return student, teacher, labels


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (0.5, 0.1), (2.0, 1.0), (3.0, 0.0)])
def test_loss_matches_float64_reference(kind, T, alpha):
    student, teacher, labels = random_case(seed=int(T * 10 + alpha * 100))
    got = DistillationLoss(T, alpha, kind, beta=0.3)(student, teacher, labels)
    want = reference_loss(student, teacher, labels, T, alpha, kind, beta=0.3)
    assert abs(got.item() - want.item()) < 1e-5, (got.item(), want.item())


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_matches_autograd_reference(kind):
    student, teacher, labels = random_case(seed=3)
    x = student.clone().requires_grad_()
    DistillationLoss(2.0, 0.7, kind, beta=0.4, chunk_size=4)(x, teacher, labels).backward()
    ref = student.double().clone().requires_grad_()
    reference_loss(ref, teacher, labels, 2.0, 0.7, kind, beta=0.4).backward()
    assert torch.allclose(x.grad.double(), ref.grad, atol=1e-6)
    masked = labels == -100
    assert x.grad[masked].abs().max() == 0  # ignored positions get no gradient


def test_jsd_endpoints_are_the_two_kls():
    student, teacher, labels = random_case(seed=4)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = DistillationLoss(2.0, 0.6, "jsd", beta=beta)(student, teacher, labels)
        kl = DistillationLoss(2.0, 0.6, kind)(student, teacher, labels)
        assert torch.allclose(jsd, kl, atol=1e-7)
        assert abs(kl.item() - reference_loss(student, teacher, labels, 2.0, 0.6, kind).item()) < 1e-5
    # and the scaled JSD tends to them: JSD/beta -> forward KL, JSD/(1 - beta) -> reverse KL
    s, t = student.double() / 4, teacher.double() / 4  # float64 in, float64 out
    for beta, kind, scale in ((1e-5, "forward_kl", 1e-5), (1 - 1e-5, "reverse_kl", 1e-5)):
        jsd = DistillationLoss(1.0, 1.0, "jsd", beta=beta)(s, t, labels) / scale
        kl = DistillationLoss(1.0, 1.0, kind)(s, t, labels)
        assert abs(jsd.item() / kl.item() - 1) < 1e-3


def test_chunking_and_dtype_do_not_change_the_loss():
    student, teacher, labels = random_case(B=2, T=9, V=300, seed=5)
    values = [DistillationLoss(2.0, 0.5, chunk_size=c)(student, teacher, labels).item()
              for c in (None, 1, 4, 7, 1000)]
    assert max(values) - min(values) < 1e-5
    bf16 = DistillationLoss(2.0, 0.5)(student.bfloat16(), teacher.bfloat16(), labels).item()
    assert abs(bf16 - values[0]) / values[0] < 0.05


def test_masked_positions_do_not_count():
    student, teacher, labels = random_case(seed=6)
    loss = DistillationLoss(2.0, 0.5)
    before = loss(student, teacher, labels)
    changed = student.clone()
    changed[labels == -100] += 100 * torch.randn_like(changed[labels == -100])
    teacher2 = teacher.clone()
    teacher2[labels == -100] = 0
    assert torch.allclose(before, loss(changed, teacher2, labels))
    _, parts = loss(student, teacher, labels, return_parts=True)
    assert set(parts) == {"kd", "ce"} and parts["kd"] > 0 and parts["ce"] > 0


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(kind="kl"), "kind"),
    (dict(beta=2.0), "beta"), (dict(chunk_size=0), "chunk_size")])
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DistillationLoss(**kwargs)


def test_bad_inputs_raise():
    student, teacher, labels = random_case()
    loss = DistillationLoss()
    with pytest.raises(ValueError, match="shape mismatch"):
        loss(student, teacher[:, :-1], labels)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        loss(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="labels"):
        loss(student, teacher, labels[:, :-1])
    with pytest.raises(ValueError, match="teacher"):
        loss(student, None, labels)
    v, i = teacher.topk(5, -1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        loss(student, TopKLogits(v, i + 1000), labels)


# ----------------------------------------------------------------- top-k teacher logits


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_full_vocabulary_equals_live_teacher(kind):
    student, teacher, labels = random_case(seed=7)
    v, i = teacher.topk(teacher.shape[-1], -1)
    live = DistillationLoss(2.0, 0.5, kind)(student, teacher, labels)
    cached = DistillationLoss(2.0, 0.5, kind)(student, TopKLogits(v, i), labels)
    assert abs(live.item() - cached.item()) < 1e-5


def test_topk_forward_kl_renormalises_the_teacher():
    student, teacher, labels = random_case(seed=8)
    k, T = 5, 2.0
    v, i = teacher.topk(k, -1)
    got = DistillationLoss(T, 1.0)(student, TopKLogits(v, i), labels).item()
    keep = labels != -100
    q = torch.softmax(v.double() / T, -1)[keep]  # teacher renormalised over its top-k
    logp = torch.log_softmax(student.double() / T, -1).gather(-1, i)[keep]  # full student
    want = T ** 2 * (q * (q.log() - logp)).sum(-1).mean().item()
    assert abs(got - want) < 1e-5
    # reverse KL compares on the same k tokens, with the student renormalised there too
    p = torch.softmax(student.double().gather(-1, i) / T, -1)[keep]
    want_r = T ** 2 * (p * (p.log() - q.log())).sum(-1).mean().item()
    got_r = DistillationLoss(T, 1.0, "reverse_kl")(student, TopKLogits(v, i), labels).item()
    assert abs(got_r - want_r) < 1e-5


def test_topk_fidelity_improves_with_k():
    student, teacher, labels = random_case(V=200, seed=9, scale=3.0)
    rows = topk_fidelity(student, teacher, labels, [1, 8, 64, 200], DistillationLoss(2.0, 0.5))
    errors = [r["rel_error"] for r in rows]
    masses = [r["teacher_mass"] for r in rows]
    assert errors[-1] < 1e-6 and abs(masses[-1] - 1) < 1e-6
    assert errors[0] > errors[2] and masses == sorted(masses)


def test_cache_teacher_logits_roundtrip_atomic(tmp_path):
    teacher = tiny_llama(num_layers=2, seed=1)
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "cache.safetensors"
    path.write_text("an old file that must be replaced whole")
    cache = cache_teacher_logits(teacher, windows, k=8, path=path, batch_size=2, bf16=False,
                                 progress=False)
    assert sorted(os.listdir(tmp_path)) == ["cache.safetensors"]  # no temp file left behind
    loaded = TeacherCache.load(path)
    assert loaded.k == 8 and loaded.meta["vocab_size"] == 256
    assert torch.equal(loaded.windows, windows) and torch.equal(loaded.indices, cache.indices)
    with torch.no_grad():
        full = teacher(windows).logits
    v, i = full.topk(8, -1)
    assert torch.equal(loaded.indices.long(), i)
    assert torch.allclose(loaded.values.float(), v, atol=1e-2)
    mass = torch.softmax(full, -1).topk(8, -1).values.sum(-1)
    assert torch.allclose(loaded.mass, mass, atol=1e-4)
    assert cache.full_vocab_nbytes() == 5 * 12 * 256 * 4
    assert cache.nbytes() == 5 * 12 * (8 * 2 + 8 * 4 + 4)
    with pytest.raises(ValueError, match="k="):
        cache_teacher_logits(teacher, windows, k=0)


# ----------------------------------------------------------------- the trainer


def tiny_data(n=32, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, T), generator=g), torch.randint(0, 256, (4, T), generator=g)


def run(student, train, steps=6, **kwargs):
    cfg_kwargs = dict(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, teacher_bf16=False,
                      progress=False)
    cfg_kwargs.update(kwargs.pop("cfg", {}))
    trainer = DistillationTrainer(student, train, config=TrainConfig(**cfg_kwargs), **kwargs)
    return trainer, trainer.train()


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 4, 20, 0.1) for s in range(21)]
    assert f[0] == 0.25 and f[3] == 1.0 and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and abs(f[20] - 0.1) < 1e-9


def test_trainer_is_deterministic_and_learns():
    train, val = tiny_data()
    teacher = tiny_llama(num_layers=3, seed=1)
    results = []
    for _ in range(2):
        student = tiny_llama(num_layers=2, seed=2)
        trainer, history = run(student, train, steps=8, teacher=teacher, val_windows=val,
                               loss=DistillationLoss(2.0, 1.0), cfg=dict(eval_every=4))
        results.append((flat_params(student), [r["loss"] for r in history["train"]]))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    losses = results[0][1]
    assert losses[-1] < losses[0]  # the KD term falls as the student moves toward the teacher
    assert [e["step"] for e in history["eval"]] == [0, 4, 8]
    assert {"step", "lr", "grad_norm", "loss", "kd", "ce", "tokens", "seconds"} <= set(history["train"][0])


def test_gradient_accumulation_matches_a_big_batch():
    train, _ = tiny_data()
    a, b = tiny_llama(seed=2), tiny_llama(seed=2)
    run(a, train, steps=3, loss=DistillationLoss(alpha=0.0), cfg=dict(batch_size=8, max_grad_norm=0.0))
    run(b, train, steps=3, loss=DistillationLoss(alpha=0.0),
        cfg=dict(batch_size=4, grad_accum=2, max_grad_norm=0.0))
    assert torch.allclose(flat_params(a), flat_params(b), atol=1e-6)


def test_trainer_from_cache_and_clipping():
    train, val = tiny_data()
    teacher = tiny_llama(num_layers=3, seed=1)
    cache = cache_teacher_logits(teacher, train, k=16, bf16=False, progress=False)
    student = tiny_llama(seed=2)
    _, history = run(student, cache, steps=4, val_windows=val, loss=DistillationLoss(1.0, 0.5),
                     cfg=dict(max_grad_norm=1e-3))
    assert all(r["kd"] > 0 for r in history["train"])
    assert len(history["eval"]) == 2


def test_trainer_config_and_data_errors():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(checkpoint_every=2)
    train, _ = tiny_data(n=4)
    with pytest.raises(ValueError, match="teacher"):
        DistillationTrainer(tiny_llama(), train, loss=DistillationLoss(alpha=0.5))
    with pytest.raises(ValueError, match="windows"):
        DistillationTrainer(tiny_llama(), train, loss=DistillationLoss(alpha=0.0),
                            config=TrainConfig(batch_size=8))
    with pytest.raises(ValueError, match="vocab"):
        DistillationTrainer(tiny_llama(), train, teacher=tiny_llama(vocab_size=300))


def test_hidden_state_loss_with_projection():
    train, _ = tiny_data()
    teacher = tiny_llama(num_layers=3, seed=1)  # width 32
    student = tiny_llama(num_layers=2, hidden_size=16, num_heads=2, num_kv_heads=1, seed=2)
    hidden = HiddenStateLoss(16, 32, HiddenStateLoss.last_layers(student, teacher), kind="cosine")
    assert isinstance(hidden.proj, torch.nn.Linear)
    proj_before = hidden.proj.weight.detach().clone()
    _, history = run(student, train, steps=3, teacher=teacher, hidden=hidden,
                     loss=DistillationLoss(2.0, 0.5))
    assert all(0 <= r["hidden"] <= 2 for r in history["train"])
    assert not torch.equal(proj_before, hidden.proj.weight)  # the projection trains too
    same = HiddenStateLoss(8, 8, [(0, 0)], kind="mse")
    h = (torch.randn(2, 3, 8),)
    assert same(h, h).item() == 0 and isinstance(same.proj, torch.nn.Identity)
    with pytest.raises(ValueError, match="kind"):
        HiddenStateLoss(8, 8, [(0, 0)], kind="l1")


def test_shift_labels_masks_last_and_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    assert shift_labels(ids).tolist() == [[6, 7, 0, 0, -100]]
    assert shift_labels(ids, pad_token_id=0).tolist() == [[6, 7, -100, -100, -100]]


# ----------------------------------------------------------------- kill-and-resume, DDP


def _worker(out, *args, torchrun=False, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"] if torchrun else [sys.executable]
    cmd = launcher + [str(WORKER), "--out", str(out), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _result(out, rank=0):
    return json.loads((Path(out) / f"rank{rank}.json").read_text())


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    _worker(tmp_path / "full", "--steps", 10)
    killed = _worker(tmp_path / "killed", "--steps", 10, "--checkpoint-dir", ckpt,
                     "--checkpoint-every", 3, "--kill-at", 7, check=False)
    assert killed.returncode != 0 and not (tmp_path / "killed").exists()  # really killed
    assert (ckpt / "checkpoint.pt").is_file() and not list(ckpt.glob(".tmp-*"))
    state = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6  # the last checkpoint before the kill
    _worker(tmp_path / "resumed", "--steps", 10, "--checkpoint-dir", ckpt, "--checkpoint-every", 3,
            "--resume")
    full, resumed = _result(tmp_path / "full"), _result(tmp_path / "resumed")
    assert resumed["steps"] == 10 and len(resumed["losses"]) == 10
    assert resumed["losses"][-1] == pytest.approx(full["losses"][-1], abs=1e-6)
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-6)
    assert resumed["val_ppl"] == pytest.approx(full["val_ppl"], rel=1e-6)
    assert resumed["weights_sha256"] == full["weights_sha256"] or torch.allclose(
        torch.tensor(resumed["weights"]), torch.tensor(full["weights"]), atol=1e-6)


def test_ddp_two_cpu_processes_train_and_agree(tmp_path):
    _worker(tmp_path / "ddp", "--steps", 6, "--batch-size", 2, torchrun=True)
    r0, r1 = _result(tmp_path / "ddp", 0), _result(tmp_path / "ddp", 1)
    assert r0["world"] == r1["world"] == 2
    assert r0["weights_sha256"] == r1["weights_sha256"]  # both processes hold the same student
    assert r0["losses"] == pytest.approx(r1["losses"])  # the logged loss is the mean over ranks
    assert r0["losses"][-1] < r0["losses"][0]
    # 2 processes x batch 2 take the same steps as 1 process x batch 4 (DDP averages gradients)
    _worker(tmp_path / "single", "--steps", 6, "--batch-size", 4)
    single = _result(tmp_path / "single")
    assert torch.allclose(torch.tensor(r0["weights"]), torch.tensor(single["weights"]), atol=1e-5)
    assert r0["losses"] == pytest.approx(single["losses"], abs=1e-5)


# ----------------------------------------------------------------- sequence-level KD, real teacher


@pytest.mark.teacher
def test_generate_distillation_data_and_real_cache(teacher):
    model, tokenizer = teacher
    data = generate_distillation_data(model, tokenizer, ["def add(a, b):", "The list type"],
                                      max_new_tokens=4, progress=False)
    assert data.input_ids.shape[0] == 2 and len(data.texts) == 2
    for row, lab in zip(data.input_ids, data.labels):
        kept = (lab != -100).nonzero().flatten()
        assert len(kept) == 4  # exactly the 4 generated tokens are targets
        assert torch.equal(lab[kept], row[kept + 1])
    windows = data.input_ids[:1, :6]
    cache = cache_teacher_logits(model, windows, k=64, bf16=True, progress=False)
    assert cache.mass.min() > 0.3 and cache.full_vocab_nbytes() / cache.nbytes() > 400
    student = tiny_llama(vocab_size=model.config.vocab_size, hidden_size=16, num_heads=2,
                         num_kv_heads=1)
    _, history = run(student, data, steps=2, loss=DistillationLoss(alpha=0.0),
                     cfg=dict(batch_size=2))
    assert history["train"][-1]["tokens"] == 8
    assert math.isfinite(history["train"][-1]["loss"])
