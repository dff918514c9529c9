"""distill_lab.distillation.trainer: determinism, accumulation, kill-and-resume, 2-process DDP, and the
options heal and QAT use (schedules, sampling with replacement, every position, a loss callable)."""

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill_lab
from distill_lab.data import sample_batch
from distill_lab.distillation.cache import cache_teacher_logits
from distill_lab.distillation.data import SequenceData, shift_labels
from distill_lab.distillation.losses import DistillationLoss, HiddenStateLoss
from distill_lab.distillation.train_config import TrainConfig
from distill_lab.distillation.trainer import DistillationTrainer, lr_factor
from distill_lab.models import tiny_llama

from ._helpers import flat_params, run, tiny_data

WORKER = Path(__file__).with_name("distill_worker.py")


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


# ----------------------------------------------------------------- the options heal and QAT use


def test_schedules_and_their_checks():
    steps = 7
    for s in range(steps + 3):  # QAT's cosine, written as QAT wrote it: equal to the last bit
        qat = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        assert lr_factor(s, 0, steps, 0.1, "cosine") == qat
        assert lr_factor(s, 0, steps, 0.1, "constant") == 1.0
    assert lr_factor(3, 4, 20, 0.1) == lr_factor(3, 4, 20, 0.1, "warmup_cosine") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(schedule="cosine")  # the default warmup_steps=10 applies to 'warmup_cosine' only
    with pytest.raises(ValueError, match="sampling"):
        TrainConfig(sampling="shuffle")
    with pytest.raises(ValueError, match="fused"):
        TrainConfig(fused="yes")


def _plain_loop(student, teacher, windows, steps, batch_size, lr, seed):
    """What heal's former local loop and QAT did by hand: the trainer must reproduce it bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    loss_fn = DistillationLoss(kd_temperature=2.0, alpha=1.0)
    losses = []
    student.train()
    for _ in range(steps):
        batch = sample_batch(windows, batch_size, gen)
        with torch.no_grad():
            t_logits = teacher(batch).logits
        loss = loss_fn(student(batch).logits.float(), t_logits.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("callable_loss", [False, True])
def test_every_position_random_sampling_reproduces_a_plain_loop(callable_loss):
    train, _ = tiny_data(n=6)
    teacher = tiny_llama(num_layers=3, seed=1)
    a, b = tiny_llama(seed=2), tiny_llama(seed=2)
    want = _plain_loop(a, teacher, train, steps=5, batch_size=8, lr=3e-3, seed=4)  # 8 > 6 windows: with replacement
    cfg = TrainConfig(steps=5, batch_size=8, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.999), warmup_steps=0,
                      min_lr_ratio=0.1, schedule="cosine", sampling="random", fused=False, reseed=False,
                      teacher_bf16=False, seed=4, progress=False)
    loss = DistillationLoss(kd_temperature=2.0, alpha=1.0)
    if callable_loss:
        loss = loss.forward  # a plain callable(student_logits, teacher_logits)
    rng = torch.get_rng_state()
    trainer = DistillationTrainer(b, train, teacher=teacher, loss=loss, config=cfg, every_position=True,
                                  freeze_teacher=False, desc="test")
    history = trainer.train()
    assert [r["loss"] for r in history["train"]] == want
    assert torch.equal(flat_params(a), flat_params(b))
    assert torch.equal(torch.get_rng_state(), rng)  # reseed=False: the caller's RNG is untouched
    assert all(p.requires_grad for p in teacher.parameters())  # freeze_teacher=False
    assert history["train"][0]["tokens"] == 8 * 16  # every position counts


def test_random_sampling_resumes_exactly(tmp_path):
    train, _ = tiny_data(n=8)
    teacher = tiny_llama(num_layers=3, seed=1)
    cfg = dict(steps=6, batch_size=4, warmup_steps=0, schedule="constant", sampling="random", teacher_bf16=False,
               progress=False)
    _, full = run(tiny_llama(seed=2), train, teacher=teacher, loss=DistillationLoss(1.0, 1.0), cfg=cfg)

    def stop(trainer, step, row):
        if step == 4:
            raise KeyboardInterrupt

    ckpt = dict(cfg, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama(seed=2), train, teacher=teacher, loss=DistillationLoss(1.0, 1.0), cfg=ckpt, callbacks=[stop])
    resumed = DistillationTrainer(tiny_llama(seed=2), train, teacher=teacher, loss=DistillationLoss(1.0, 1.0),
                                  config=TrainConfig(**ckpt))
    history = resumed.train(resume=True)
    assert [r["loss"] for r in history["train"]] == [r["loss"] for r in full["train"]]


def test_loss_options_are_checked():
    train, _ = tiny_data(n=8)
    teacher = tiny_llama(num_layers=3, seed=1)
    kd = DistillationLoss(1.0, 1.0).forward
    with pytest.raises(ValueError, match="every_position"):
        DistillationTrainer(tiny_llama(), train, teacher=teacher, loss=kd)
    with pytest.raises(ValueError, match="alpha=1"):
        DistillationTrainer(tiny_llama(), train, teacher=teacher, loss=DistillationLoss(alpha=0.5),
                            every_position=True)
    cache = cache_teacher_logits(teacher, train, k=4, bf16=False, progress=False)
    with pytest.raises(ValueError, match="teacher"):
        DistillationTrainer(tiny_llama(), cache, loss=kd, every_position=True)
    data = SequenceData(train, shift_labels(train), [""] * len(train))
    with pytest.raises(ValueError, match="SequenceData"):
        DistillationTrainer(tiny_llama(), data, teacher=teacher, loss=DistillationLoss(alpha=1.0),
                            every_position=True)
    with pytest.raises(ValueError, match="loss="):
        DistillationTrainer(tiny_llama(), train, teacher=teacher, loss="kl", every_position=True)
    # sampling='random' draws with replacement, so a batch may exceed the windows
    DistillationTrainer(tiny_llama(), train[:2], loss=DistillationLoss(alpha=0.0),
                        config=TrainConfig(batch_size=4, sampling="random"))


# ----------------------------------------------------------------- one loop: heal and QAT run this trainer


def _function_sources(path: Path, names) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    return {node.name: ast.get_source_segment(path.read_text(), node) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name in names}


def test_heal_and_qat_have_no_loop_of_their_own():
    package = Path(distill_lab.__file__).parent
    sources = _function_sources(package / "pruning" / "healing.py", {"heal", "_heal_local", "kl_to_teacher"})
    assert set(sources) == {"heal", "_heal_local", "kl_to_teacher"}
    sources["qat.py"] = (package / "quantization" / "qat.py").read_text()
    for name, source in sources.items():
        for loop_mark in (".backward(", "optimizer.step(", "opt.step(", "torch.optim.", "log_softmax", "kl_div"):
            assert loop_mark not in source, f"{name} has its own training loop or divergence: {loop_mark}"


def test_heal_and_train_qat_step_through_the_trainer(monkeypatch):
    from distill_lab import pruning as prune
    from distill_lab.quantization import Int4WeightOnlyConfig
    from distill_lab.quantization import qat

    steps = []
    real = DistillationTrainer.train_step

    def counted(self):
        steps.append(self.desc)
        return real(self)

    monkeypatch.setattr(DistillationTrainer, "train_step", counted)
    teacher = tiny_llama(num_layers=3, seed=1)
    windows, _ = tiny_data(n=8)
    for use_trainer in (True, False):
        prune.heal(tiny_llama(seed=2), teacher, windows, steps=2, batch_size=4, bf16=False, progress=False,
                   use_trainer=use_trainer)
    student = tiny_llama(seed=2)
    qat.prepare_qat_(student, Int4WeightOnlyConfig(group_size=32))
    qat.train_qat(student, teacher, windows, steps=3, batch_size=4, bf16=False, progress=False)
    assert steps == ["healing"] * 4 + ["QAT"] * 3
