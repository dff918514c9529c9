"""distill_lab.distillation.on_policy: on-policy distillation (GKD) inside the one training loop.

A spy teacher records what it is asked to score; the tests check that it sees exactly the prompt plus
the student's own samples, that only the generated positions carry loss, that ``lmbda=0`` is the
off-policy trainer bit for bit, and that a few on-policy steps bring the student closer to the teacher
on its own text.
"""

import copy
import re

import pytest
import torch
from torch import nn

from distill_lab.distillation import on_policy
from distill_lab.distillation.cache import cache_teacher_logits
from distill_lab.distillation.data import SequenceData, shift_labels
from distill_lab.distillation.losses import IGNORE_INDEX, DistillationLoss
from distill_lab.distillation.on_policy import generated_labels, is_on_policy_step
from distill_lab.distillation.train_config import TrainConfig
from distill_lab.distillation.trainer import DistillationTrainer
from distill_lab.models import tiny_llama

from ._helpers import flat_params, run, tiny_data

P, G = 4, 6  # prompt tokens, generated tokens (windows are 16 tokens)
ON = {"prompt_tokens": P, "gen_tokens": G}


class SpyTeacher(nn.Module):
    """Wraps a teacher; records each input and the logits it returned. ``corrupt=True`` replaces its logits
    at every position that does not predict a generated token with noise (they must not matter)."""

    def __init__(self, model, corrupt=False):
        super().__init__()
        self.model, self.config, self.corrupt = model, model.config, corrupt
        self.inputs, self.logits = [], []

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids, **kwargs)
        if self.corrupt and input_ids.shape[1] == P + G:
            noise = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(len(self.inputs))) * 50
            keep = torch.zeros(input_ids.shape[1], dtype=torch.bool)
            keep[P - 1:P + G - 1] = True  # positions whose logits predict a generated token
            out.logits = torch.where(keep[None, :, None], out.logits, noise)
        self.inputs.append(input_ids.detach().clone())
        self.logits.append(out.logits.detach().clone())
        return out


def _kd():
    return DistillationLoss(kd_temperature=1.0, alpha=1.0)


def _teacher():
    return tiny_llama(num_layers=3, seed=1)


# ----------------------------------------------------------------- labels and the coin


def test_labels_cover_only_the_generated_tokens():
    ids = torch.arange(2 * (P + G)).reshape(2, P + G)
    labels = generated_labels(ids, P)
    assert (labels[:, :P - 1] == IGNORE_INDEX).all()  # the prompt predicting itself: no loss
    assert torch.equal(labels[:, P - 1:P + G - 1], ids[:, P:])  # each generated token, at the logit predicting it
    assert (labels[:, -1] == IGNORE_INDEX).all()  # nothing follows the last token
    assert int((labels != IGNORE_INDEX).sum()) == 2 * G


def test_the_coin_is_seeded_and_has_probability_lmbda():
    flips = [is_on_policy_step(7, s, 0.3) for s in range(2000)]
    assert flips == [is_on_policy_step(7, s, 0.3) for s in range(2000)]  # a function of (seed, step)
    assert flips != [is_on_policy_step(8, s, 0.3) for s in range(2000)]
    assert 0.26 < sum(flips) / 2000 < 0.34
    rng = torch.get_rng_state()
    assert not any(is_on_policy_step(7, s, 0.0) for s in range(50))
    assert all(is_on_policy_step(7, s, 1.0) for s in range(50))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never touched


def test_sampling_is_seeded_and_restores_train_mode():
    student = tiny_llama(seed=2).train()
    prompts = torch.randint(0, 256, (3, P), generator=torch.Generator().manual_seed(0))
    a = on_policy.sample_continuations(student, prompts, G, generator=torch.Generator().manual_seed(1))
    b = on_policy.sample_continuations(student, prompts, G, generator=torch.Generator().manual_seed(1))
    c = on_policy.sample_continuations(student, prompts, G, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, P + G) and torch.equal(a[:, :P], prompts)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert student.training


# ----------------------------------------------------------------- the teacher scores the student's own tokens


def _plain_sample(student, prompts, gen_tokens, generator):
    """Ancestral sampling without a KV cache: the whole sequence through the model for every token."""
    ids = prompts
    with torch.no_grad():
        for _ in range(gen_tokens):
            probs = torch.softmax(student(ids).logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
    return ids


def test_teacher_scores_exactly_the_prompt_and_the_students_samples():
    train, _ = tiny_data()
    student, spy = tiny_llama(seed=2), SpyTeacher(_teacher())
    before = copy.deepcopy(student)
    fed_back = []  # single tokens the student is given while it generates (eval mode)
    student.register_forward_hook(
        lambda m, args, out: fed_back.append(args[0].clone()) if not m.training and args[0].shape[1] == 1 else None)
    cfg = TrainConfig(steps=1, batch_size=4, lr=3e-3, warmup_steps=0, teacher_bf16=False, progress=False,
                      lmbda=1.0, seed=3, **ON)
    trainer = DistillationTrainer(student, train, teacher=spy, loss=_kd(), config=cfg)
    rows = trainer._batch_rows(0, 0)
    row = trainer.train_step()
    (seen,) = spy.inputs
    assert seen.shape == (4, P + G)
    assert torch.equal(seen[:, :P], train[rows][:, :P])  # the prompt: a prefix of the batch's windows
    assert torch.equal(seen[:, P:P + G - 1], torch.cat(fed_back, 1))  # the tokens the student produced
    gen = torch.Generator().manual_seed(on_policy._seed(3, 0, 0, 0))  # step 0, micro-batch 0, rank 0
    assert torch.equal(seen, _plain_sample(before, train[rows][:, :P], G, gen))  # sampled from the student
    # the loss: the divergence at exactly the generated positions, with the teacher's logits of that call
    labels = shift_labels(seen)
    labels[:, :P - 1] = IGNORE_INDEX
    want = _kd()(before.train()(seen).logits, spy.logits[0], labels)
    assert row["loss"] == pytest.approx(float(want.detach()), rel=1e-6)
    assert row["tokens"] == 4 * G and row["on_policy"] == 1.0 and row["gen_seconds"] > 0


def test_teacher_logits_outside_the_generated_positions_never_count():
    train, _ = tiny_data()
    cfg = dict(lmbda=1.0, **ON)
    _, clean = run(tiny_llama(seed=2), train, steps=3, teacher=SpyTeacher(_teacher()), loss=_kd(), cfg=cfg)
    _, noisy = run(tiny_llama(seed=2), train, steps=3, teacher=SpyTeacher(_teacher(), corrupt=True), loss=_kd(), cfg=cfg)
    assert [r["loss"] for r in noisy["train"]] == [r["loss"] for r in clean["train"]]
    # the control: noise at one generated position does change the loss
    spy = SpyTeacher(_teacher())
    run(tiny_llama(seed=2), train, steps=1, teacher=spy, loss=_kd(), cfg=cfg)
    seen, logits = spy.inputs[0], spy.logits[0]
    labels = generated_labels(seen, P)
    with torch.no_grad():
        s_logits = tiny_llama(seed=2).train()(seen).logits
    bent = logits.clone()
    bent[:, P - 1] += 50 * torch.randn(bent[:, P - 1].shape, generator=torch.Generator().manual_seed(0))
    assert float(_kd()(s_logits, bent, labels)) != pytest.approx(float(_kd()(s_logits, logits, labels)), rel=1e-3)


# ----------------------------------------------------------------- lmbda: 0 is the old trainer, 1 is all on-policy


def test_lmbda_zero_is_the_off_policy_trainer_bit_for_bit(monkeypatch):
    train, val = tiny_data()
    a, b = tiny_llama(seed=2), tiny_llama(seed=2)
    _, old = run(a, train, steps=5, teacher=_teacher(), val_windows=val, loss=DistillationLoss(2.0, 0.5))

    def never(*args, **kwargs):
        raise AssertionError("lmbda=0 must not generate")

    monkeypatch.setattr(on_policy, "sample_continuations", never)
    _, new = run(b, train, steps=5, teacher=_teacher(), val_windows=val, loss=DistillationLoss(2.0, 0.5),
                 cfg={"lmbda": 0.0, "prompt_tokens": 3, "gen_tokens": 5, "sampling_temperature": 0.5})
    for key in ("loss", "kd", "ce", "grad_norm", "tokens"):
        assert [r[key] for r in new["train"]] == [r[key] for r in old["train"]]
    assert new["eval"] == old["eval"]
    assert torch.equal(flat_params(a), flat_params(b))
    assert all(r["on_policy"] == 0.0 and r["gen_seconds"] == 0.0 for r in new["train"])


def test_lmbda_one_makes_every_step_on_policy_and_half_mixes():
    train, _ = tiny_data()
    spy = SpyTeacher(_teacher())
    _, history = run(tiny_llama(seed=2), train, steps=4, teacher=spy, loss=_kd(), cfg=dict(lmbda=1.0, grad_accum=2, **ON))
    assert [r["on_policy"] for r in history["train"]] == [1.0] * 4
    assert [tuple(x.shape) for x in spy.inputs] == [(4, P + G)] * 8  # every micro-batch of every step
    summary = on_policy.on_policy_summary(history)
    assert summary["on_policy_fraction"] == 1.0 and 0 < summary["gen_seconds"] < summary["seconds"]
    spy = SpyTeacher(_teacher())
    _, history = run(tiny_llama(seed=2), train, steps=10, teacher=spy, loss=_kd(),
                     cfg=dict(lmbda=0.5, seed=1, grad_accum=2, **ON))
    flips = [is_on_policy_step(1, s, 0.5) for s in range(10)]
    assert 0 < sum(flips) < 10
    assert [r["on_policy"] for r in history["train"]] == [float(f) for f in flips]
    # one coin per optimizer step: both micro-batches of a step are on-policy, or neither
    assert [x.shape[1] for x in spy.inputs] == [P + G if f else 16 for f in flips for _ in range(2)]
    assert on_policy.on_policy_summary(history)["on_policy_fraction"] == sum(flips) / 10


def test_seeded_runs_are_reproducible_and_resume_exactly(tmp_path):
    train, _ = tiny_data()
    cfg = dict(lmbda=0.5, seed=5, warmup_steps=0, **ON)
    runs = []
    for seed in (5, 5, 6):
        spy = SpyTeacher(_teacher())
        student = tiny_llama(seed=2)
        _, history = run(student, train, steps=6, teacher=spy, loss=_kd(), cfg=dict(cfg, seed=seed))
        runs.append(([r["loss"] for r in history["train"]], flat_params(student), spy.inputs))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(x, y) for x, y in zip(runs[0][2], runs[1][2]))
    assert runs[0][0] != runs[2][0]

    def stop(trainer, step, row):
        if step == 4:
            raise KeyboardInterrupt

    ckpt = dict(cfg, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama(seed=2), train, steps=6, teacher=_teacher(), loss=_kd(), cfg=ckpt, callbacks=[stop])
    resumed = DistillationTrainer(tiny_llama(seed=2), train, teacher=_teacher(), loss=_kd(),
                                  config=TrainConfig(steps=6, batch_size=4, lr=3e-3, teacher_bf16=False,
                                                     progress=False, **ckpt))
    history = resumed.train(resume=True)
    assert [r["loss"] for r in history["train"]] == runs[0][0]


# ----------------------------------------------------------------- checks


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "0.5"])
def test_bad_lmbda_names_the_value_and_the_range(bad):
    with pytest.raises(ValueError, match=re.escape(f"TrainConfig.lmbda={bad!r}; allowed: a float in [0, 1]")):
        TrainConfig(lmbda=bad)


def test_bad_on_policy_settings_are_rejected():
    for name, bad, allowed in [("prompt_tokens", 0, ">= 1"), ("gen_tokens", 2.0, ">= 1"),
                               ("sampling_temperature", 0.0, "> 0"), ("sampling_temperature", float("inf"), "> 0")]:
        with pytest.raises(ValueError, match=rf"TrainConfig\.{name}={bad!r}; allowed: .*{allowed}"):
            TrainConfig(**{name: bad})
    train, _ = tiny_data(n=8)
    teacher = _teacher()
    cfg = TrainConfig(batch_size=4, lmbda=0.5, **ON)
    with pytest.raises(ValueError, match="live teacher"):
        DistillationTrainer(tiny_llama(), train, loss=DistillationLoss(alpha=0.0), config=cfg)
    with pytest.raises(ValueError, match="alpha=1"):
        DistillationTrainer(tiny_llama(), train, teacher=teacher, loss=DistillationLoss(alpha=0.5), config=cfg)
    with pytest.raises(ValueError, match="TeacherCache"):
        DistillationTrainer(tiny_llama(), cache_teacher_logits(teacher, train, k=4, bf16=False, progress=False),
                            teacher=teacher, loss=_kd(), config=cfg)
    with pytest.raises(ValueError, match="SequenceData"):
        DistillationTrainer(tiny_llama(), SequenceData(train, shift_labels(train), [""] * 8), teacher=teacher,
                            loss=_kd(), config=cfg)
    with pytest.raises(ValueError, match="every_position=False"):
        DistillationTrainer(tiny_llama(), train, teacher=teacher, loss=_kd(), config=cfg, every_position=True)
    with pytest.raises(ValueError, match=r"prompt_tokens=17; allowed: an int in \[1, 16\]"):
        DistillationTrainer(tiny_llama(), train, teacher=teacher, loss=_kd(),
                            config=TrainConfig(batch_size=4, lmbda=1.0, prompt_tokens=17))


# ----------------------------------------------------------------- it learns


def test_on_policy_steps_bring_the_student_closer_to_the_teacher_on_its_own_text():
    train, _ = tiny_data()
    prompts = torch.randint(0, 256, (16, P), generator=torch.Generator().manual_seed(9))  # held out
    teacher = _teacher()
    with torch.no_grad():  # a peaked teacher (logits ~ 10x): something to learn in a few steps
        teacher.model.embed_tokens.weight.mul_(10)
    student = tiny_llama(seed=2)
    before = on_policy.on_policy_divergence(student, teacher, prompts, 8, seed=5)
    _, history = run(student, train, steps=20, teacher=teacher, loss=_kd(),
                     cfg={"lr": 1e-2, "lmbda": 1.0, "prompt_tokens": P, "gen_tokens": 8})
    after = on_policy.on_policy_divergence(student, teacher, prompts, 8, seed=5)
    assert before > 1.0  # a real gap to close (nats per token)
    assert 0.4 * before < after < 0.85 * before  # measured: after ~ 0.71 · before
    assert sum(r["loss"] for r in history["train"][-5:]) < sum(r["loss"] for r in history["train"][:5])
