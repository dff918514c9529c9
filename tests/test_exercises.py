"""Every exercise check accepts a right answer and rejects typical wrong ones, naming the mistake; the lab plumbing
plugs a learner's function into a model and puts the model back.

Right and wrong answers are written here the way a learner would write them (not copied from the references).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import distill_lab as dl
from distill_lab.exercises import awq_lab as AWQ
from distill_lab.exercises import baseline as B
from distill_lab.exercises import gkd as G
from distill_lab.exercises import guarded_recipe as GR
from distill_lab.exercises import combined as C
from distill_lab.exercises import distillation as D
from distill_lab.exercises import pruning as P
from distill_lab.exercises import quantization as Q
from distill_lab.exercises import pruning_heads as PH
from distill_lab.exercises import q4_1 as Q41
from distill_lab.exercises import quantization_algorithms as QA
from distill_lab.exercises import roofline as R
from distill_lab.exercises import ste as STE
from distill_lab.exercises import students as ST
from distill_lab.exercises._check import check, label_of, yours_or_reference
from distill_lab.exercises._lab import block_linears, weights_replaced


def rejects(check_fn, answer, hint, *args, **kwargs):
    """The check raises AssertionError and its message names ``hint``."""
    with pytest.raises(AssertionError) as err:
        check_fn(answer, *args, **kwargs)
    assert "likely mistake" in str(err.value) and hint in str(err.value), str(err.value)


def todo(*args, **kwargs):
    raise NotImplementedError()


# ------------------------------------------------------------------------------------------ 00


def token_nll(logits, ids):
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_token_nll():
    logits, ids = torch.randn(2, 6, 40), torch.randint(0, 40, (2, 6))
    assert B.check_token_nll(token_nll, logits=logits, input_ids=ids)
    rejects(B.check_token_nll, lambda z, i: -torch.log_softmax(z, -1).gather(-1, i[..., None])[..., 0], "not shifted")
    rejects(B.check_token_nll, lambda z, i: torch.log_softmax(z[:, :-1], -1).gather(-1, i[:, 1:, None])[..., 0],
            "sign")
    rejects(B.check_token_nll, lambda z, i: -torch.softmax(z[:, :-1], -1).gather(-1, i[:, 1:, None])[..., 0],
            "probabilities instead of log-probabilities")


def test_perplexity():
    assert B.check_perplexity(lambda nll: torch.exp(nll.mean()), nll=torch.rand(50) * 4)
    assert B.check_perplexity(lambda nll: torch.exp(nll.mean()), logits=torch.randn(1, 9, 30),
                              input_ids=torch.randint(0, 30, (1, 9)))
    rejects(B.check_perplexity, lambda nll: nll.exp().mean(), "exponentiated each token")
    rejects(B.check_perplexity, lambda nll: nll.sum().exp(), "summed instead of averaged")
    rejects(B.check_perplexity, lambda nll: nll.mean(), "forgot the exp")


def test_temperature_softmax():
    def stable(z, t):
        z = z / t
        e = (z - z.max(-1, keepdim=True).values).exp()
        return e / e.sum(-1, keepdim=True)

    assert B.check_temperature_softmax(stable, logits=torch.randn(300) * 8)
    rejects(B.check_temperature_softmax, lambda z, t: torch.softmax(z * t, -1), "multiplied by the temperature")
    rejects(B.check_temperature_softmax, lambda z, t: (z / t).exp() / (z / t).exp().sum(-1, keepdim=True), "overflow")
    rejects(B.check_temperature_softmax, lambda z, t: torch.softmax(z / t, 0), "wrong dimension")


@pytest.mark.parametrize("hint,wrong", B._NLL_MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_nll_mistake_gets_its_own_hint(hint, wrong):
    rejects(B.check_token_nll, wrong, hint)


def test_perplexity_with_runs_the_learners_functions(tiny):
    windows = torch.randint(0, 256, (3, 16))
    harness = dl.perplexity(tiny, windows, batch_size=2, progress=False)
    mine = B.perplexity_with(tiny, windows, token_nll, lambda nll: nll.mean().exp(), batch_size=2)
    assert mine["by"] == "yours" and mine["tokens"] == 3 * 15 and mine["ppl"] == pytest.approx(harness, rel=1e-5)
    fallback = B.perplexity_with(tiny, windows, todo, todo, batch_size=2)
    assert fallback["by"] == "reference" and fallback["ppl"] == pytest.approx(harness, rel=1e-5)


def test_entropies_with():
    logits = torch.randn(100) * 3
    ent = B.entropies_with(lambda z, t: torch.softmax(z / t, -1), logits, (0.5, 2.0))
    ref = B.entropies_with(todo, logits, (0.5, 2.0))
    assert ent["by"] == "yours" and ref["by"] == "reference"
    assert ent["bits"][0.5] < ent["bits"][2.0] and ent["bits"] == pytest.approx(ref["bits"], rel=1e-5)


# ------------------------------------------------------------------------------------------ 01


def kd(s, t, T):
    log_p = F.log_softmax(s / T, dim=-1)
    log_q = F.log_softmax(t / T, dim=-1)
    return T ** 2 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()


@pytest.mark.filterwarnings("ignore:reduction")  # F.kl_div(reduction="mean") is one of the wrong answers
def test_kd_loss():
    real = (torch.randn(5, 300) * 3, torch.randn(5, 300) * 3)
    assert D.check_kd_loss(kd, logits=real)
    rejects(D.check_kd_loss, lambda s, t, T: kd(s, t, T) / T ** 2, "missing T²")
    rejects(D.check_kd_loss, lambda s, t, T: kd(t, s, T), "KL direction swapped")
    rejects(D.check_kd_loss, lambda s, t, T: T ** 2 * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1),
                                                               reduction="mean"), "averaged over the vocabulary")
    rejects(D.check_kd_loss, lambda s, t, T: T ** 2 * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1),
                                                               reduction="sum"), "summed over the rows")


@pytest.mark.parametrize("hint,wrong", D._KD_MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_kd_mistake_gets_its_own_hint(hint, wrong):
    rejects(D.check_kd_loss, wrong, hint)


def test_reverse_kl():
    def rkl(s, t, T):
        log_p, log_q = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    assert D.check_reverse_kl(rkl)
    rejects(D.check_reverse_kl, lambda s, t, T: T ** 2 * rkl(s, t, T), "T² factor")
    rejects(D.check_reverse_kl, lambda s, t, T: kd(s, t, T) / T ** 2, "forward KL")


def test_topk_teacher():
    def topk(values, indices, vocab, T):
        return torch.zeros(*values.shape[:-1], vocab).scatter_(-1, indices, torch.softmax(values / T, -1))

    assert D.check_topk_teacher(topk, logits=torch.randn(6, 500) * 4, k=16)
    rejects(D.check_topk_teacher, lambda v, i, V, T: topk(v * T, i, V, T), "temperature ignored")
    rejects(D.check_topk_teacher, lambda v, i, V, T: torch.zeros(*v.shape[:-1], V).scatter_(-1, i, v / T),
            "raw logits")


def test_train_step():
    def step(student, teacher, batch, optimizer, loss_fn, temperature):
        with torch.no_grad():
            t = teacher(batch).logits
        s = student(batch).logits
        loss = loss_fn(s.flatten(0, 1), t.flatten(0, 1), temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def no_zero_grad(student, teacher, batch, optimizer, loss_fn, temperature):
        with torch.no_grad():
            t = teacher(batch).logits
        loss = loss_fn(student(batch).logits.flatten(0, 1), t.flatten(0, 1), temperature)
        loss.backward()
        optimizer.step()
        return loss.item()

    def teacher_with_grad(student, teacher, batch, optimizer, loss_fn, temperature):
        t = teacher(batch).logits
        loss = loss_fn(student(batch).logits.flatten(0, 1), t.flatten(0, 1), temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    assert D.check_train_step(step)
    rejects(D.check_train_step, no_zero_grad, "gradients accumulate")
    rejects(D.check_train_step, teacher_with_grad, "torch.no_grad()")
    assert D.check_train_step(todo) is False


@pytest.mark.parametrize("hint,wrong", D._STEP_MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_step_mistake_gets_its_own_hint(hint, wrong):
    rejects(D.check_train_step, wrong, hint)


def test_train_with_matches_the_reference_loop():
    teacher = dl.tiny_llama(seed=1)
    windows = torch.randint(0, 256, (6, 12))
    mine = D.train_with(lambda: dl.tiny_llama(seed=2), teacher, windows, D.reference_train_step, kd, steps=3,
                        batch_size=2, lr=1e-2)
    ref = D.train_with(lambda: dl.tiny_llama(seed=2), teacher, windows, todo, todo, steps=3, batch_size=2, lr=1e-2)
    assert mine["by"] == "yours" and ref["by"] == "reference" and len(mine["losses"]) == 3
    assert D.curves_agree(mine["losses"], ref["losses"]) is None
    assert D.curves_agree([1.0, 2.0], [1.0, 2.1]) is not None


# ------------------------------------------------------------------------------------------ 02


def absmax(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scales = w.abs().amax(dim=1) / qmax
    return torch.round(w / scales[:, None]), scales


def group_rtn(w, bits, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / (2 ** bits - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return (torch.round((g - lo) / step).clamp(0, 2 ** bits - 1) * step + lo).reshape(rows, cols)


def test_absmax_quantize():
    layer = torch.nn.Linear(128, 48)
    assert Q.check_absmax_quantize(absmax, layer=layer)
    rejects(Q.check_absmax_quantize, lambda w, b: (torch.round(w / (w.abs().amax(1, keepdim=True) / 2 ** (b - 1))),
                                                   w.abs().amax(1) / 2 ** (b - 1)), "off by one")
    rejects(Q.check_absmax_quantize, lambda w, b: (torch.round(w / (w.abs().max() / (2 ** (b - 1) - 1))),
                                                   (w.abs().max() / (2 ** (b - 1) - 1)).expand(w.shape[0])),
            "one scale for the whole tensor")
    rejects(Q.check_absmax_quantize, lambda w, b: (torch.trunc(w / absmax(w, b)[1][:, None]), absmax(w, b)[1]),
            "truncated")


def test_group_rtn():
    layer = torch.nn.Linear(192, 32)
    assert Q.check_group_rtn(group_rtn, layer=layer)
    assert Q.check_minmax_group_fake_quant(group_rtn)
    rejects(Q.check_group_rtn, lambda w, b, g: group_rtn(w, b, w.shape[1]), "per-row instead of per-group")
    rejects(Q.check_group_rtn, lambda w, b, g: group_rtn(w.reshape(1, -1), b, w.numel()).reshape(w.shape),
            "per-tensor instead of per-group")

    def off_by_one(w, bits, group_size):
        rows, cols = w.shape
        g = w.reshape(rows, -1, group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = (hi - lo) / 2 ** bits
        return (torch.round((g - lo) / step).clamp(0, 2 ** bits - 1) * step + lo).reshape(rows, cols)

    rejects(Q.check_group_rtn, off_by_one, "levels off by one")

    def integer_zero_point(w, bits, group_size):
        rows, cols = w.shape
        g = w.reshape(rows, -1, group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo) / (2 ** bits - 1)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(g / scale) + zero, 0, 2 ** bits - 1)
        return ((q - zero) * scale).reshape(rows, cols)

    rejects(Q.check_group_rtn, integer_zero_point, "zero point rounded")


@pytest.mark.parametrize("hint,wrong", Q._GROUP_MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_group_mistake_gets_its_own_hint(hint, wrong):
    rejects(Q.check_group_rtn, wrong, hint)


def test_group_rtn_accepts_rounding_ties_that_go_the_other_way():
    def other_ties(w, bits, group_size):  # the same grid, computed in another order (ties may round differently)
        rows, cols = w.shape
        g = w.double().reshape(rows, -1, group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = (hi - lo) / (2 ** bits - 1)
        return (torch.round(g / step - lo / step).clamp(0, 2 ** bits - 1) * step + lo).reshape(rows, cols).float()

    assert Q.check_group_rtn(other_ties, layer=torch.nn.Linear(256, 64))


def test_sqnr():
    def sqnr(w, w_hat):
        return 10 * math.log10((w ** 2).sum() / ((w - w_hat) ** 2).sum())

    assert Q.check_sqnr(sqnr, layer=torch.nn.Linear(128, 32))
    rejects(Q.check_sqnr, lambda w, w_hat: 20 * torch.log10((w ** 2).sum() / ((w - w_hat) ** 2).sum()), "20·log10")
    rejects(Q.check_sqnr, lambda w, w_hat: 10 * torch.log10(((w - w_hat) ** 2).sum() / (w ** 2).sum()), "inverted")
    rejects(Q.check_sqnr, lambda w, w_hat: 10 * torch.log((w ** 2).sum() / ((w - w_hat) ** 2).sum()), "natural log")


def test_layer_sqnr():
    w = torch.randn(32, 128)
    mine = Q.layer_sqnr(w, lambda a, b: 10 * math.log10((a ** 2).sum() / ((a - b) ** 2).sum()), group_rtn,
                        [(8, 64), (4, 64)])
    assert mine["by"] == "yours" and mine["db"] == pytest.approx(mine["package"], abs=1e-3)
    assert mine["db"][(8, 64)] > mine["db"][(4, 64)] + 20  # about 6 dB per bit
    assert Q.layer_sqnr(w, todo, todo, [(4, 64)])["by"] == "reference"


def test_fake_quant_perplexities_restore_the_model(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    windows = torch.randint(0, 256, (2, 16))

    def ppl(model):
        return dl.perplexity(model, windows, progress=False)

    mine = Q.fake_quant_perplexities(tiny, group_rtn, [(4, 16), (2, 16)], ppl, "my_group_rtn",
                                     Q.group_rtn_reference)
    ref = Q.fake_quant_perplexities(tiny, todo, [(4, 16), (2, 16)], ppl, "my_group_rtn", Q.group_rtn_reference)
    assert mine["by"] == "yours" and ref["by"] == "reference"
    assert mine["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    absmax_ppl = Q.fake_quant_perplexities(tiny, Q.absmax_fake_quant(absmax), [(8, None)], ppl, "my_absmax_quantize",
                                           Q.package_absmax)
    assert absmax_ppl["ppl"][(8, None)] == pytest.approx(
        Q.fake_quant_perplexities(tiny, todo, [(8, None)], ppl, "x", Q.package_absmax)["ppl"][(8, None)], rel=1e-5)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())


def test_weights_replaced_restores_after_an_error(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    names = list(block_linears(tiny))
    assert "lm_head" not in names and len(names) == 2 * 7

    def boom(name, w):
        if name == names[3]:
            raise RuntimeError("boom")
        return torch.zeros_like(w)

    with pytest.raises(RuntimeError):
        with weights_replaced(tiny, boom):
            pass
    with pytest.raises(ValueError, match="shape"):
        with weights_replaced(tiny, lambda name, w: w.T):
            pass
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------------ 03


def magnitude_mask(weight, sparsity):
    k = int(sparsity * weight.shape[1])
    mask = torch.ones_like(weight, dtype=torch.bool)
    if k:
        drop = torch.topk(weight.abs(), k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def wanda(weight, x):
    return weight.abs() * x.norm(p=2, dim=0)


def two_four(scores):
    out, inp = scores.shape
    groups = scores.reshape(out, inp // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)


def test_magnitude_mask_accepts_any_choice_among_ties():
    tied = torch.randint(-4, 5, (32, 64)).float() / 8  # few distinct values, like a 4-bit grid

    def by_sort(weight, sparsity):  # sort breaks ties differently from topk
        k = int(sparsity * weight.shape[1])
        mask = torch.ones_like(weight, dtype=torch.bool)
        mask.scatter_(1, torch.sort(weight.abs(), dim=1, stable=True, descending=False).indices[:, :k], False)
        return mask

    assert P.check_magnitude_mask(magnitude_mask, layer=tied) and P.check_magnitude_mask(by_sort, layer=tied)

    def whole_matrix(weight, sparsity):
        k = int(sparsity * weight.numel())
        mask = torch.ones(weight.numel(), dtype=torch.bool)
        if k:
            mask[torch.argsort(weight.abs().flatten())[:k]] = False
        return mask.reshape(weight.shape)

    rejects(P.check_magnitude_mask, whole_matrix, "sorted the whole matrix instead of each row", layer=tied)
    def signed(weight, sparsity):  # ranks w, not |w|
        k = int(sparsity * weight.shape[1])
        mask = torch.ones_like(weight, dtype=torch.bool)
        if k:
            mask.scatter_(1, torch.topk(weight, k, dim=1, largest=False).indices, False)
        return mask

    rejects(P.check_magnitude_mask, signed, "forgot abs()", layer=tied)
    rejects(P.check_magnitude_mask, lambda w, s: ~magnitude_mask(w, s), "inverted")


def test_wanda_scores():
    w, x = torch.randn(24, 40), torch.randn(100, 40) * torch.rand(40) * 10
    assert P.check_wanda_scores(wanda, layer=w, x=x)
    rejects(P.check_wanda_scores, lambda w, x: w.abs() * x.pow(2).mean(0).sqrt(), "the mean instead of the L2 norm")
    rejects(P.check_wanda_scores, lambda w, x: w.abs() * (x ** 2).sum(0), "missing square root")
    rejects(P.check_wanda_scores, lambda w, x: w * x.norm(dim=0), "forgot abs(W)")


def test_nm_mask():
    assert P.check_nm_mask(two_four, layer=torch.randint(-3, 4, (16, 32)).float())
    rejects(P.check_nm_mask, lambda s: two_four(-s), "2 lowest")
    rejects(P.check_nm_mask, lambda s: magnitude_mask(s, 0.5), "best half of each row")


def test_channels_to_keep():
    scores = torch.rand(96)
    assert P.check_channels_to_keep(lambda s, n: torch.topk(s, n).indices, scores=scores, n_keep=80)
    assert P.check_channels_to_keep(lambda s, n: torch.argsort(s, descending=True)[:n], scores=scores, n_keep=80)
    rejects(P.check_channels_to_keep, lambda s, n: torch.argsort(s)[:n], "least important")
    rejects(P.check_channels_to_keep, lambda s, n: torch.topk(s, n).values, "returned the scores")


def test_pruned_perplexities_and_restore(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    windows = torch.randint(0, 256, (2, 16))
    norms = {name: torch.rand(lin.in_features) + 0.1 for name, lin in block_linears(tiny).items()}

    def ppl(model):
        return dl.perplexity(model, windows, progress=False)

    mine = P.pruned_perplexities(tiny, norms, ppl, magnitude_mask, wanda, two_four)
    ref = P.pruned_perplexities(tiny, norms, ppl, todo, todo, todo)
    assert mine["by"] == "yours" and ref["by"] == "reference" and set(mine["ppl"]) == {
        "magnitude 50%", "Wanda 50%", "Wanda 2:4"}
    assert mine["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())


def test_shrink_mlp_equals_the_package_channel_pruning(tiny):
    from distill_lab import pruning as package_prune

    scores = torch.rand(2, 64)
    mine, by = P.shrink_mlp(tiny, lambda s, n: torch.topk(s, n).indices, scores, 48)
    theirs = package_prune.prune_channels(tiny, 48 / 64, scores={"channels": scores})
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert by == "yours" and torch.allclose(mine(x).logits, theirs(x).logits, atol=1e-6)
    assert mine.config.intermediate_size == 48 and tiny.config.intermediate_size == 64


# ------------------------------------------------------------------------------------------ 04


def size_model(cfg, group_size):
    d, hd = cfg.hidden_size, cfg.head_dim

    def int4(out, inp):
        return out * inp // 2 + out * (inp // group_size) * 4

    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"embedding": int4(cfg.vocab_size, d),
            "attention": cfg.num_hidden_layers * (int4(q, d) + 2 * int4(kv, d) + int4(d, q)),
            "mlp": cfg.num_hidden_layers * 3 * int4(cfg.intermediate_size, d),
            "norms": 4 * d * (2 * cfg.num_hidden_layers + 1)}


def test_size_model():
    assert C.check_size_model(size_model, config=C.pruned_config(dl.tiny_llama().config, 0.5, 0.5, 0.5))

    def no_overhead(cfg, g):  # codes only
        d, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
        q, kv, inter = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
        return {"embedding": cfg.vocab_size * d // 2, "attention": layers * (2 * q * d + 2 * kv * d) // 2,
                "mlp": layers * 3 * inter * d // 2, "norms": 4 * d * (2 * layers + 1)}

    rejects(C.check_size_model, no_overhead, "group overhead")
    rejects(C.check_size_model, lambda cfg, g: {**size_model(cfg, g), "embedding": 2 * size_model(cfg, g)["embedding"]},
            "tied")
    rejects(C.check_size_model, lambda cfg, g: {**size_model(cfg, g), "norms": 0}, "forgot the norms")
    rejects(C.check_size_model, lambda cfg, g: {**size_model(cfg, g), "embedding": cfg.vocab_size * (cfg.hidden_size + 4)},
            "not int8 with a scale per row")
    with pytest.raises(AssertionError, match="expected a dict"):
        C.check_size_model(lambda cfg, g: sum(size_model(cfg, g).values()))


def test_size_model_matches_a_saved_int4_file(tmp_path):
    from distill_lab.quantization import Int4WeightOnlyConfig
    from distill_lab.quantization import quantize_, save_quantized

    model = dl.tiny_llama(hidden_size=64, num_heads=4, num_kv_heads=2)  # int4 embeddings: groups of 64 values
    quantize_(model, Int4WeightOnlyConfig(group_size=64, embedding_bits=4))
    save_quantized(model, tmp_path / "m")
    measured = C.measured_parts(tmp_path / "m")
    predicted = C.size_model_reference(model.config, 64)
    assert {k: measured[k] for k in C.PARTS} == predicted and measured["other"] == 0
    assert measured["file"] == sum(predicted.values()) + measured["header"]


def test_pruned_config_matches_structured_pruning():
    from distill_lab import pruning as package_prune

    teacher = dl.tiny_llama(hidden_size=48, num_heads=6, num_kv_heads=2)
    cfg = C.pruned_config(teacher.config, heads_keep=0.67, channels_keep=0.375)
    real = package_prune.prune_structured(teacher, package_prune.StructuredConfig(heads_keep=0.67, channels_keep=0.375))
    assert (cfg.num_attention_heads, cfg.intermediate_size) == (real.config.num_attention_heads,
                                                                 real.config.intermediate_size)
    assert C.pruned_config(teacher.config, layers_keep=0.5).num_hidden_layers == 1
    knobs = dict(heads_keep=0.67, channels_keep=0.375, quantize="int4 + AWQ")
    assert C.size_of_knobs(todo, teacher.config, knobs, 32)["total"] == sum(C.size_model_reference(cfg, 32).values())
    with pytest.raises(ValueError, match="int4"):
        C.size_of_knobs(size_model, teacher.config, dict(quantize="int8"))
    with pytest.raises(ValueError, match="embedding_bits=8"):
        C.size_of_knobs(size_model, teacher.config, dict(quantize="int4", embedding_bits=8))


def test_reduction_by_parts_is_the_measured_reduction():
    measured = {"embedding": 30, "file": 100}
    r = C.reduction_by_parts(lambda e, fe, fb: 1 / (e / fe + (1 - e) / fb), 1000, 200, measured)
    assert r["by"] == "yours" and r["reduction"] == pytest.approx(10.0) and r["share"] == 0.2
    assert C.reduction_by_parts(todo, 1000, 200, measured)["reduction"] == pytest.approx(10.0)


def test_overall_reduction():
    assert C.check_overall_reduction(lambda e, fe, fb: 1 / (e / fe + (1 - e) / fb))
    rejects(C.check_overall_reduction, lambda e, fe, fb: e * fe + (1 - e) * fb, "averaged the factors")
    rejects(C.check_overall_reduction, lambda e, fe, fb: e / fe + (1 - e) / fb, "forgot to invert")


def test_pareto_front():
    def front(sizes, ppls):
        out = torch.ones(len(sizes))
        for i in range(len(sizes)):
            for j in range(len(sizes)):
                if sizes[j] <= sizes[i] and ppls[j] <= ppls[i] and (sizes[j] < sizes[i] or ppls[j] < ppls[i]):
                    out[i] = 0
        return out

    assert C.check_pareto_front(front)
    rejects(C.check_pareto_front, lambda s, p: 1 - front(s, p), "inverted")
    rejects(C.check_pareto_front, lambda s, p: (p <= p.min()).float(), "only the best perplexity")
    points = [{"name": "a", "size_mib": 10.0, "ppl_ratio": 2.0}, {"name": "b", "size_mib": 20.0, "ppl_ratio": 1.0},
              {"name": "c", "size_mib": 30.0, "ppl_ratio": 3.0}]
    assert C.pareto_names(front, points) == (["a", "b"], "yours")
    assert C.pareto_names(todo, points) == (["a", "b"], "reference")
    assert C.pareto_names(C.pareto_reference, points)[0] == ["a", "b"]


# -------------------------------------------------------------------------------------- harness


def test_check_reports_not_attempted_and_counts_real_cases(capsys):
    assert check("x", todo, lambda a: a, [(torch.ones(2),)]) is False
    assert "not attempted yet" in capsys.readouterr().out
    assert check("x", lambda a: a * 1, lambda a: a, [(torch.ones(2),), (torch.zeros(3),)],
                 labels=[None, "the teacher's bias"])
    assert "2 cases, 1 of them on the teacher's own tensors" in capsys.readouterr().out


def test_check_does_not_let_a_function_change_the_cases():
    def in_place(a):
        return a.mul_(2)

    with pytest.raises(AssertionError):
        check("x", in_place, lambda a: a, [(torch.ones(2),)], mistakes=[("doubled", lambda a: 2 * a)])


def test_yours_or_reference(capsys):
    f = yours_or_reference(todo, lambda x: x + 1, "my_f")
    assert f(1) == 2 and f(2) == 3 and f.label == "reference" and label_of(f) == "reference"
    assert capsys.readouterr().out.count("my_f not attempted yet: the next cells use distill_lab's reference") == 1
    g = yours_or_reference(lambda x: x * 10, lambda x: x + 1)
    assert g(1) == 10 and g.label == "yours" and label_of(g) == "yours" and label_of(f, g) == "reference"


def test_compare_guess(capsys):
    from distill_lab.exercises._check import compare_guess

    def my_guess():
        return 30

    compare_guess(my_guess, 60.0, "the rise in %")
    compare_guess(todo, 60.0, "the rise in %")
    compare_guess(lambda: "forward KL", "Forward KL ", "the winner")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "the rise in %: your guess 30, measured 60 (off by a factor of 2.0)"
    assert out[1] == "todo not attempted yet: the rise in %: measured 60"
    assert out[2].endswith("(right)")


# ------------------------------------------------------------------------------------------ 02 algorithm labs


def my_smooth_group(norm_weight, weights, act_absmax, alpha):
    w_max = torch.cat([w.abs() for w in weights], dim=0).max(dim=0).values
    s = act_absmax.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
    s = s.clamp(min=1e-5)
    return norm_weight / s, [w * s for w in weights]


def test_smooth_group():
    assert QA.check_smooth_group(my_smooth_group)

    def wrong_side(norm_weight, weights, act_absmax, alpha):  # the norm multiplied, the weights divided
        s = norm_weight / my_smooth_group(norm_weight, weights, act_absmax, alpha)[0]
        return norm_weight * s, [w / s for w in weights]
    rejects(QA.check_smooth_group, wrong_side, "wrong side")
    rejects(QA.check_smooth_group, lambda n, ws, a, al: my_smooth_group(n, ws, a, 1 - al), "alpha on the wrong side")
    rejects(QA.check_smooth_group,
            lambda n, ws, a, al: (my_smooth_group(n, ws[:1], a, al)[0],
                                  [my_smooth_group(n, [w], a, al)[1][0] for w in ws]), "one scale per Linear")


def test_smooth_group_keeps_the_float_product(tiny):
    block = tiny.model.layers[0]
    attn = block.self_attn
    x = torch.randn(16, attn.q_proj.in_features)
    norm_w, ws = my_smooth_group(block.input_layernorm.weight.detach(), [attn.q_proj.weight.detach()],
                                 x.abs().amax(0), 0.5)
    s = block.input_layernorm.weight.detach() / norm_w
    torch.testing.assert_close((x / s) @ ws[0].T, x @ attn.q_proj.weight.detach().T, atol=1e-5, rtol=1e-4)


def my_w8a8_matmul(x, w):
    sx = x.abs().max(dim=1, keepdim=True).values / 127
    sw = w.abs().max(dim=1, keepdim=True).values / 127
    qx, qw = (x / sx).round().clamp(-127, 127), (w / sw).round().clamp(-127, 127)
    return (qx @ qw.T) * sx * sw.T


def test_w8a8_matmul():
    assert QA.check_w8a8_matmul(my_w8a8_matmul)
    rejects(QA.check_w8a8_matmul, lambda x, w: my_w8a8_matmul(x, w) / (x.abs().max(1, keepdim=True).values / 127)
            / (w.abs().max(1, keepdim=True).values / 127).T, "not rescaled")
    rejects(QA.check_w8a8_matmul, _w8a8_one_scale, "one scale for all tokens")


def _w8a8_one_scale(x, w):
    sx = x.abs().max() / 127
    sw = w.abs().max(dim=1, keepdim=True).values / 127
    return ((x / sx).round().clamp(-127, 127) @ (w / sw).round().clamp(-127, 127).T) * sx * sw.T


def my_best_alpha(x, norm_weight, weights, act_absmax, alphas):
    errors = []
    for alpha in alphas:
        new_norm, new_ws = my_smooth_group(norm_weight, weights, act_absmax, alpha)
        x_s = x * new_norm / norm_weight  # the smoothed norm emits x / s
        err = 0.0
        for w, w_s in zip(weights, new_ws):
            exact = x @ w.T
            err += float(((my_w8a8_matmul(x_s, w_s) - exact) ** 2).sum() / (exact ** 2).sum())
        errors.append(err)
    return alphas[errors.index(min(errors))], errors


def test_best_alpha():
    assert QA.check_best_alpha(my_best_alpha)
    rejects(QA.check_best_alpha, lambda *c: QA._alpha_variant(worst=True)(*c), "largest error picked")
    rejects(QA.check_best_alpha, lambda *c: QA._alpha_variant(unscaled_input=True)(*c), "input is not divided")


def test_smoothing_lab_on_a_group_with_an_outlier():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, 3] *= 80  # one loud channel
    w = torch.randn(16, 32, generator=g) * 0.05
    groups = {"g": (torch.ones(32), [w], x.abs().amax(0), x)}
    out = QA.smoothing_lab(groups, my_smooth_group, my_w8a8_matmul)
    r = out["g"]
    assert out["by"] == "yours" and r["float_change"] < 1e-5
    assert r["yours"] < r["plain"] and r["yours"] == pytest.approx(r["package"], rel=1e-3)
    assert QA.smoothing_lab(groups, todo, todo)["by"] == "reference"


def my_gptq(w, h, bits, group_size, damp):
    w = w.double().clone()
    k = w.shape[1]
    h = h.double() + damp * torch.diag(h.double()).mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros_like(w)
    for i in range(k):
        if i % group_size == 0:
            grp = w[:, i:i + group_size]
            lo = grp.min(dim=1).values
            step = ((grp.max(dim=1).values - lo) / (2 ** bits - 1)).clamp(min=1e-8)
        q = ((w[:, i] - lo) / step).round().clamp(0, 2 ** bits - 1) * step + lo
        q_all[:, i] = q
        err = (w[:, i] - q) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return q_all.float()


def test_gptq_layer():
    assert QA.check_gptq_layer(my_gptq)
    rtn = lambda w, h, b, g, d: dl.quantization.primitives.fake_quantize(w, b, g, symmetric=False)  # noqa: E731
    rejects(QA.check_gptq_layer, rtn, "no error feedback")

    def plus_sign(w, h, bits, g, damp):
        return QA._gptq_variant(sign=1.0)(w, h, bits, g, damp)
    rejects(QA.check_gptq_layer, plus_sign, "wrong sign")

    def undamped(w, h, bits, g, damp):
        return my_gptq(w, h, bits, g, 0.0)
    rejects(QA.check_gptq_layer, undamped, "not damped")


@pytest.mark.parametrize("kw", [dict(grid_from_original=True), dict(use_hessian=True)], ids=str)
def test_each_gptq_mistake_gets_its_own_hint(kw):
    hint = {"grid_from_original": "original weights", "use_hessian": "instead of H⁻¹"}[next(iter(kw))]
    rejects(QA.check_gptq_layer, QA._gptq_variant(**kw), hint)


def test_gptq_layer_errors_order_rtn_above_gptq():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 4, 64)
    w = torch.randn(32, 64, generator=g) * 0.1
    out = QA.gptq_layer_errors(w, x.T @ x / 256, my_gptq, bits=3, group_size=16)
    assert out["by"] == "yours" and out["yours"] < out["rtn"]
    assert out["yours"] == pytest.approx(out["package"], rel=0.05)


# ------------------------------------------------------------------------------------------ 03 algorithm lab


def my_prune_query_heads(q_weight, o_weight, head_scores, kv_heads, keep_per_group):
    n_heads = head_scores.numel()
    per_group, head_dim = n_heads // kv_heads, q_weight.shape[0] // n_heads
    kept = []
    for g in range(kv_heads):
        scores = head_scores[g * per_group:(g + 1) * per_group]
        best = scores.argsort(descending=True)[:keep_per_group].sort().values
        kept += [g * per_group + int(i) for i in best]
    kept = torch.tensor(kept)
    rows = (kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return q_weight[rows], o_weight[:, rows], kept


def test_prune_query_heads():
    assert PH.check_prune_query_heads(my_prune_query_heads)

    def across_groups(q, o, s, kv, k):
        kept = s.argsort(descending=True)[:kv * k].sort().values
        rows = (kept[:, None] * (q.shape[0] // s.numel()) + torch.arange(q.shape[0] // s.numel())).reshape(-1)
        return q[rows], o[:, rows], kept
    rejects(PH.check_prune_query_heads, across_groups, "GQA groups no longer match")

    def o_by_rows(q, o, s, kv, k):
        q2, _, kept = my_prune_query_heads(q, o, s, kv, k)
        d = q.shape[0] // s.numel()
        return q2, o[(kept[:, None] * d + torch.arange(d)).reshape(-1)], kept
    rejects(PH.check_prune_query_heads, o_by_rows, "o_proj sliced by rows")


def test_shrink_heads_equals_structured_pruning_on_the_same_scores(tiny):
    from distill_lab import pruning

    scores = pruning.importance(tiny, "l2_norm")
    mine, by = PH.shrink_heads(tiny, my_prune_query_heads, scores["heads"], keep_per_group=1)
    package = pruning.prune_structured(tiny, pruning.StructuredConfig(heads_keep=0.5, importance="l2_norm"),
                                       scores=scores)
    ids = torch.randint(0, 256, (1, 12))
    assert by == "yours" and mine.config.num_attention_heads == 2 == package.config.num_attention_heads
    assert dl.parameter_count(mine) == dl.parameter_count(package) < dl.parameter_count(tiny)
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, package(ids).logits)
    assert PH.shrink_heads(tiny, todo, scores["heads"], 1)[1] == "reference"


@pytest.mark.parametrize("hint,wrong", PH._MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_head_pruning_mistake_gets_its_own_hint(hint, wrong):
    rejects(PH.check_prune_query_heads, wrong, hint)


# ------------------------------------------------------------------------------------------ 01 algorithm lab


def my_block_influence(pairs):
    scores = []
    for x_in, x_out in pairs:
        cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)  # (B, T)
        scores.append(1 - cos.mean())
    return torch.stack(scores)


def my_drop_blocks(model, keep):
    import copy
    small = copy.deepcopy(model)
    small.model.layers = torch.nn.ModuleList([small.model.layers[i] for i in keep])
    for new_index, layer in enumerate(small.model.layers):
        layer.self_attn.layer_idx = new_index
    small.config.num_hidden_layers = len(keep)
    if getattr(small.config, "layer_types", None) is not None:
        small.config.layer_types = [small.config.layer_types[i] for i in keep]
    return small


def test_block_influence(tiny):
    assert ST.check_block_influence(my_block_influence)
    assert ST.check_block_influence(my_block_influence, ST.block_io(tiny, torch.randint(0, 256, (2, 10))))
    rejects(ST.check_block_influence, lambda pairs: 1 - my_block_influence(pairs), "cosine similarity instead")
    rejects(ST.check_block_influence,
            lambda pairs: torch.stack([1 - torch.nn.functional.cosine_similarity(a, b, dim=1).mean() for a, b in pairs]),
            "wrong axis")


def test_drop_blocks(tiny):
    model = dl.tiny_llama(num_layers=4)
    assert ST.check_drop_blocks(my_drop_blocks, model, keep=(0, 2, 3))

    def stale_layer_idx(model, keep):
        small = my_drop_blocks(model, keep)
        for i, layer in zip(keep, small.model.layers):
            layer.self_attn.layer_idx = i
        return small
    with pytest.raises(AssertionError, match="old layer_idx"):
        ST.check_drop_blocks(stale_layer_idx, model, keep=(0, 2, 3))

    def in_place(model, keep):
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
        return my_drop_blocks(model, range(len(keep)))
    with pytest.raises(AssertionError, match="original model changed"):
        ST.check_drop_blocks(in_place, dl.tiny_llama(num_layers=4), keep=(0, 2, 3))


def test_student_from_influence(tiny):
    pairs = ST.block_io(tiny, torch.randint(0, 256, (2, 10)))
    out = ST.student_from_influence(tiny, pairs, my_block_influence, my_drop_blocks, n_keep=1)
    assert out["by"] == "yours" and out["keep"] == out["package_keep"] and len(out["keep"]) == 1
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(out["model"](ids).logits, out["package_model"](ids).logits)
    assert ST.student_from_influence(tiny, pairs, todo, todo, 1)["by"] == "reference"


# ------------------------------------------------------------------------------------------ 04 algorithm lab


def my_pack_q4_1(w):
    rows, k = w.shape
    blocks = torch.as_tensor(w, dtype=torch.float32).reshape(-1, 32)
    lo, hi = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
    d = (hi - lo) / 15
    q = torch.where(d > 0, (blocks - lo) / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(blocks))
    q = q.round().clamp(0, 15).to(torch.uint8)
    nibbles = q[:, :16] | (q[:, 16:] << 4)  # element j low, element j + 16 high
    head = torch.cat([d.half().view(torch.uint8), lo.half().view(torch.uint8)], dim=1)  # fp16 d, fp16 m
    return torch.cat([head, nibbles], dim=1).reshape(rows, -1).numpy()


def my_unpack_q4_1(blocks, k):
    b = torch.as_tensor(blocks).reshape(-1, 20)
    d = b[:, 0:2].contiguous().view(torch.float16).float()
    m = b[:, 2:4].contiguous().view(torch.float16).float()
    q = torch.cat([b[:, 4:] & 15, b[:, 4:] >> 4], dim=1).float()
    return (d * q + m).reshape(-1, k).numpy()


def test_pack_q4_1():
    assert Q41.check_pack_q4_1(my_pack_q4_1)
    rejects(Q41.check_pack_q4_1, lambda w: Q41._pack_variant(levels=16)(w), "levels off by one")

    def interleaved(w):
        out = my_pack_q4_1(w).reshape(-1, 20)
        q = torch.cat([torch.as_tensor(out[:, 4:]) & 15, torch.as_tensor(out[:, 4:]) >> 4], 1)  # codes in order
        out[:, 4:] = (q[:, 0::2] | (q[:, 1::2] << 4)).numpy()
        return out.reshape(len(w), -1)
    rejects(Q41.check_pack_q4_1, interleaved, "neighbours share a byte")


@pytest.mark.parametrize("hint,wrong", Q41._PACK_MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_q4_1_mistake_gets_its_own_hint(hint, wrong):
    rejects(Q41.check_pack_q4_1, wrong, hint)


def test_unpack_q4_1():
    assert Q41.check_unpack_q4_1(my_unpack_q4_1)
    rejects(Q41.check_unpack_q4_1, lambda b, k: my_unpack_q4_1(b, k) - _min_of(b, k), "minimum is missing")

    def high_nibble_first(blocks, k):  # element j read from the high 4 bits
        b = torch.as_tensor(blocks).reshape(-1, 20)
        d = b[:, 0:2].contiguous().view(torch.float16).float()
        m = b[:, 2:4].contiguous().view(torch.float16).float()
        q = torch.cat([b[:, 4:] >> 4, b[:, 4:] & 15], dim=1).float()
        return (d * q + m).reshape(-1, k).numpy()
    rejects(Q41.check_unpack_q4_1, high_nibble_first, "nibbles swapped")


def _min_of(blocks, k):
    b = torch.as_tensor(blocks).reshape(-1, 20)
    m = b[:, 2:4].contiguous().view(torch.float16).float()  # (blocks, 1)
    return m.repeat(1, 32).reshape(-1, k).numpy()


def test_gguf_round_trip_is_lossless_on_a_grid(tmp_path):
    codes = torch.randint(0, 16, (8, 64))
    codes[:, 0::32], codes[:, 1::32] = 0, 15  # every block spans the whole grid, so its step is 0.125 again
    w = codes.float() * 0.125 - 1.0  # a 4-bit grid with exact fp16 steps
    out = Q41.gguf_round_trip(w, my_pack_q4_1, my_unpack_q4_1, tmp_path / "one.gguf")
    assert out["by"] == "yours" and out["same_bytes_as_gguf"] and out["yours_equals_gguf"]
    assert out["max_error_gguf"] < 1e-6 and out["file_bytes"] < out["fp32_bytes"] + 4096
    assert Q41.gguf_round_trip(w, todo, todo, tmp_path / "two.gguf")["by"] == "reference"


# ------------------------------------------------------------------------------------------ 00 algorithm lab


def my_decode_bytes(config, context, weight_bytes=4, kv_bytes=4):
    h, layers = config.hidden_size, config.num_hidden_layers
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attention = h * config.num_attention_heads * d * 2 + h * config.num_key_value_heads * d * 2  # q, o; k, v
    mlp = 3 * h * config.intermediate_size  # gate, up, down
    params = layers * (attention + mlp + 2 * h) + h  # + two norms per block, the final norm
    params += config.vocab_size * h * (1 if config.tie_word_embeddings else 2)  # embedding (and an untied head)
    cache = 2 * layers * config.num_key_value_heads * d * context * kv_bytes  # keys and values so far
    return params * weight_bytes + cache


def my_amdahl(share, speedup):
    return 1 / ((1 - share) + share / speedup)


def test_decode_bytes(tiny):
    assert R.check_decode_bytes(my_decode_bytes, tiny.config)
    rejects(R.check_decode_bytes, lambda c, n, w=4, k=4: my_decode_bytes(c, 0, w, k), "KV cache is missing")
    rejects(R.check_decode_bytes, lambda c, n, w=4, k=4: my_decode_bytes(c, n, w, k) - (
        c.num_hidden_layers * c.num_key_value_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        * n * k), "keys only")


@pytest.mark.parametrize("kw", [dict(heads="q"), dict(tied_twice=True), dict(two_mlp=True)], ids=str)
def test_each_decode_bytes_mistake_gets_its_own_hint(kw):
    hint = {"heads": "query heads", "tied_twice": "counted twice", "two_mlp": "two MLP"}[next(iter(kw))]
    rejects(R.check_decode_bytes, R._bytes_variant(**kw), hint)


def test_amdahl():
    assert R.check_amdahl(my_amdahl)
    rejects(R.check_amdahl, lambda f, s: s, "applied to the whole step")
    rejects(R.check_amdahl, lambda f, s: (1 - f) + f / s, "the time, not the speed-up")


def test_roofline_lab(tiny):
    out = R.roofline_lab(tiny, measured_tokens_per_s=100.0, decode_bytes=my_decode_bytes, amdahl=my_amdahl,
                         kernel_speedup=4.0)
    assert out["by"] == "yours" and out["bandwidth"] > 1e8 and 0 < out["matmul_share"] <= 1
    assert out["bytes_per_token"] == out["package"]["bytes_per_token"]
    assert out["model_speedup"] == pytest.approx(out["package"]["model_speedup"]) and 1 <= out["model_speedup"] <= 4
    assert R.roofline_lab(tiny, 100.0, todo, todo, 4.0)["by"] == "reference"


def my_generalized_jsd(student_logits, teacher_logits, beta):
    log_p = torch.log_softmax(student_logits, dim=-1)
    log_q = torch.log_softmax(teacher_logits, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(beta), log_p + math.log(1 - beta)]), dim=0)
    kl_q_m = (log_q.exp() * (log_q - log_m)).sum(-1)
    kl_p_m = (log_p.exp() * (log_p - log_m)).sum(-1)
    return beta * kl_q_m + (1 - beta) * kl_p_m


def my_gkd_step(student, teacher, prompts, gen_tokens, beta, optimizer, generator):
    student.eval()
    ids = prompts
    with torch.no_grad():
        for _ in range(gen_tokens):  # no KV cache: slower, the same tokens
            probs = torch.softmax(student(ids).logits[:, -1].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
        teacher_logits = teacher(ids).logits
    student.train()
    p = prompts.shape[1]
    s = student(ids).logits[:, p - 1:-1]  # the positions that predict the generated tokens
    t = teacher_logits[:, p - 1:-1]
    loss = my_generalized_jsd(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), beta).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return ids, loss.item()


@pytest.mark.parametrize("hint,wrong", G._JSD_MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_jsd_mistake_gets_its_own_hint(hint, wrong):
    rejects(G.check_generalized_jsd, wrong, hint)


def test_generalized_jsd():
    assert G.check_generalized_jsd(my_generalized_jsd)

    def mixed_logits(s, t, beta):  # the mixture taken of the logits, not of the distributions
        log_m = torch.log_softmax(beta * t + (1 - beta) * s, dim=-1)
        log_p, log_q = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        return beta * (log_q.exp() * (log_q - log_m)).sum(-1) + (1 - beta) * (log_p.exp() * (log_p - log_m)).sum(-1)
    rejects(G.check_generalized_jsd, mixed_logits, "mixture of the logits")
    rejects(G.check_generalized_jsd, lambda s, t, b: (torch.softmax(t, -1) * (torch.log_softmax(t, -1)
                                                                           - torch.log_softmax(s, -1))).sum(-1),
            "forward KL")


def test_gkd_step():
    student, teacher = dl.tiny_llama(seed=1), dl.tiny_llama(seed=2)
    prompts = torch.randint(0, 256, (2, 5))
    assert G.check_gkd_step(my_gkd_step, student, teacher, prompts)

    def whole_window(student, teacher, prompts, gen_tokens, beta, optimizer, generator):
        with torch.no_grad():
            ids = G.sample_continuations(student, prompts, gen_tokens, 1.0, generator)
            t = teacher(ids).logits
        s = student(ids).logits
        loss = my_generalized_jsd(s.reshape(-1, 256), t.reshape(-1, 256), beta).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return ids, loss.item()
    rejects(G.check_gkd_step, whole_window, "prompt's positions are in the loss", student, teacher, prompts)

    def no_step(student, teacher, prompts, gen_tokens, beta, optimizer, generator):
        ids, _ = G.gkd_step_reference(copy.deepcopy(student), teacher, prompts, gen_tokens, beta,
                                      torch.optim.SGD(student.parameters(), lr=0.0), generator)
        with torch.no_grad():
            loss = G._package_loss(student, teacher, ids, prompts.shape[1], beta)
        return ids, float(loss)
    rejects(G.check_gkd_step, no_step, "one step down", student, teacher, prompts)


def test_gkd_lab_lowers_the_on_policy_divergence():
    student, teacher = dl.tiny_llama(seed=1), dl.tiny_llama(seed=2)
    prompts = torch.randint(0, 256, (4, 6))
    out = G.gkd_lab(student, teacher, prompts, my_gkd_step, steps=6, gen_tokens=6, lr=3e-3)
    assert out["by"] == "yours" and len(out["losses"]) == 6 and out["after"] < out["before"]


class MySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits, group_size):
        groups = w.reshape(w.shape[0], -1, group_size)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = (hi - lo) / (2 ** bits - 1)
        step = torch.where(step > 0, step, torch.ones_like(step))
        q = ((groups - lo) / step).round().clamp(0, 2 ** bits - 1) * step + lo
        return q.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None  # straight through


def my_fake_quant_ste(w, bits, group_size):
    return MySTE.apply(w, bits, group_size)


def test_fake_quant_ste(tiny):
    assert STE.check_fake_quant_ste(my_fake_quant_ste, tiny.model.layers[0].mlp.down_proj)

    class Rounded(torch.autograd.Function):  # backward returns nothing useful
        @staticmethod
        def forward(ctx, w, bits, g):
            return MySTE.forward(ctx, w, bits, g)

        @staticmethod
        def backward(ctx, grad_output):
            return torch.zeros_like(grad_output), None, None
    rejects(STE.check_fake_quant_ste, lambda w, b, g: Rounded.apply(w, b, g), "no straight-through gradient")
    rejects(STE.check_fake_quant_ste, lambda w, b, g: w * 1.0, "does not quantize")


@pytest.mark.parametrize("hint,wrong", STE._MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_ste_mistake_gets_its_own_hint(hint, wrong):
    rejects(STE.check_fake_quant_ste, wrong, hint)


def test_ste_qat_lab_curves_agree(tiny):
    windows = torch.randint(0, 256, (4, 16))
    out = STE.ste_qat_lab(tiny, windows, my_fake_quant_ste, steps=3, bits=4, group_size=16, lr=1e-3)
    assert out["by"] == "yours" and len(out["yours"]) == 3
    assert out["yours"] == pytest.approx(out["package"], rel=1e-2)  # float rounding of the grid may differ
    assert STE.ste_qat_lab(tiny, windows, todo, steps=1, group_size=16)["by"] == "reference"


def my_run_guarded(model, steps, ratio, max_ratio):
    history, last_good = [], model
    for i, (label, step) in enumerate(steps):
        model = step(copy.deepcopy(model))
        r = ratio(model)
        heals_next = i + 1 < len(steps) and steps[i + 1][0] in ("distil", "qat") and math.isfinite(r)
        ok = math.isfinite(r) and (heals_next or r <= max_ratio)
        history.append({"step": label, "ratio": r, "judged": not heals_next, "kept": ok})
        if not ok:
            break
        if not heals_next:
            last_good = model
    return last_good, history


def test_run_guarded():
    assert GR.check_run_guarded(my_run_guarded)

    def judges_prune(model, steps, ratio, max_ratio):
        history = []
        for label, step in steps:
            candidate = step(copy.deepcopy(model))
            history.append({"step": label, "ratio": ratio(candidate)})
            if ratio(candidate) > max_ratio:
                break
            model = candidate
        return model, history
    rejects(GR.check_run_guarded, judges_prune, "judged before healing")

    def in_place(model, steps, ratio, max_ratio):  # no copy: the failed step overwrote the last good model
        history, good = [], model
        for i, (label, step) in enumerate(steps):
            model = step(model)
            heal = i + 1 < len(steps) and steps[i + 1][0] == "distil"
            history.append({"step": label, "ratio": ratio(model)})
            if not heal and ratio(model) > max_ratio:
                break
            good = model if not heal else good
        return good, history
    rejects(GR.check_run_guarded, in_place, "run each on a copy")

    def nan_passes(model, steps, ratio, max_ratio):  # a NaN compares False with everything: it slips through
        history, good = [], model
        for i, (label, step) in enumerate(steps):
            model = step(copy.deepcopy(model))
            heal = i + 1 < len(steps) and steps[i + 1][0] == "distil"
            history.append({"step": label, "ratio": ratio(model)})
            if not heal and ratio(model) > max_ratio:
                break
            good = model if not heal else good
        return good, history
    rejects(GR.check_run_guarded, nan_passes, "NaN ratio was let through")


def test_guarded_recipe_lab(tiny):
    steps = [("prune", lambda m: m), ("distil", lambda m: m)]
    out = GR.guarded_recipe_lab(tiny, steps, lambda m: 1.0, my_run_guarded, max_ratio=1.5)
    assert out["by"] == "yours" and [h["step"] for h in out["history"]] == ["prune", "distil"] == \
        [h["step"] for h in out["package_history"]]


def my_awq_search(x, weights, act_mean, grid, bits=4, group_size=64):
    errors, best_a, best_s, best_err = [], 0.0, None, float("inf")
    for a in torch.linspace(0, 1, grid).tolist():
        s = act_mean.clamp(min=1e-6) ** a
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            w_q = Q.group_rtn_reference(w * s, bits, group_size)  # round-to-nearest of the scaled weight
            err += float(((x / s) @ w_q.T - x @ w.T).pow(2).sum())
        errors.append(err)
        if err < best_err:
            best_a, best_s, best_err = a, s, err
    return best_a, best_s, errors


def test_awq_search():
    assert AWQ.check_awq_search(my_awq_search)

    def weights_only(x, weights, act_mean, grid, bits=4, group_size=64):  # forgot to divide the input
        errors, best = [], (float("inf"), 0.0, None)
        for a in torch.linspace(0, 1, grid).tolist():
            s = act_mean.clamp(min=1e-6) ** a
            s = s / (s.max() * s.min()).sqrt()
            err = sum(float((x @ Q.group_rtn_reference(w * s, bits, group_size).T - x @ w.T).pow(2).sum())
                      for w in weights)
            errors.append(err)
            best = min(best, (err, a, s), key=lambda b: b[0])
        return best[1], best[2], errors
    rejects(AWQ.check_awq_search, weights_only, "input is not divided")


@pytest.mark.parametrize("hint,wrong", AWQ._MISTAKES, ids=lambda x: x[:30] if isinstance(x, str) else "")
def test_each_awq_mistake_gets_its_own_hint(hint, wrong):
    rejects(AWQ.check_awq_search, wrong, hint)


def test_awq_block_lab():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, 3] *= 40
    w = torch.randn(16, 32, generator=g) * 0.05
    out = AWQ.awq_block_lab(x, [w], x.abs().mean(0), my_awq_search, package_a=0.5, grid=5, group_size=16)
    assert out["by"] == "yours" and out["best_error"] <= out["rtn_error"] and len(out["errors"]) == 5
