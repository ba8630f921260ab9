"""AdamP and SGDP against the authors' package, their edge cases, and the premises of the
experiments: the projection, the closed-form norm growth of plain GD, and scale invariance of the
BN-preceded weights of our networks."""

import copy
import math

import numpy as np
import pytest
import torch

from repsuite.optim import SGDP, AdamP
from repsuite.optim.adamp import project_radial, scale_invariance_view
from repsuite.optim.models import BNCNN, BNMLP, bn_preceded_weights, build_model
from repsuite.optim.scale_invariance import (
    NormTracker,
    calibrate_toy_lr,
    compare_optimizers,
    cosine_loss,
    effective_step_size,
    make_optimizer,
    scale_invariance_gap,
    toy_run,
    toy_starts,
    train_normalized,
)

adamp_ref = pytest.importorskip("adamp", reason="the authors' package is the reference")

SHAPES = [(6, 3, 3, 3), (5, 8), (4, 2, 5), (9,), (3, 1)]


def _gradient(w: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """A random gradient, orthogonal to w row by row ('channel'), over the whole tensor ('layer'),
    or not at all ('none'), so that all branches of the scale-invariance test are exercised."""
    r = torch.randn(w.shape, generator=g, dtype=w.dtype)
    if kind == "none" or w.dim() < 2:
        return r
    rows = 1 if kind == "layer" else w.shape[0]
    wv, rv = w.reshape(rows, -1), r.reshape(rows, -1)
    rv = rv - (rv * wv).sum(1, keepdim=True) / (wv * wv).sum(1, keepdim=True) * wv
    return rv.reshape(w.shape)


def _pair(kind: str, **hp):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    ours = [t.clone().requires_grad_(True) for t in init]
    ref = [t.clone().requires_grad_(True) for t in init]
    if kind == "sgdp":
        return ours, ref, SGDP(ours, **hp), adamp_ref.SGDP(ref, **hp)
    return ours, ref, AdamP(ours, **hp), adamp_ref.AdamP(ref, **hp)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(
    "kind, hp",
    [
        ("sgdp", dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
        ("sgdp", dict(lr=0.05, momentum=0.5, weight_decay=0.0, delta=0.2, wd_ratio=0.3)),
        ("adamp", dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2)),
        ("adamp", dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.0, eps=1e-6)),
    ],
)
def test_matches_authors_package_step_for_step(kind, hp, nesterov):
    ours, ref, opt, opt_ref = _pair(kind, nesterov=nesterov, **hp)
    g = torch.Generator().manual_seed(1)
    seen = set()
    for step in range(24):
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            grad = _gradient(a.detach(), ("channel", "layer", "none")[(step + i) % 3], g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        opt_ref.step()
        seen |= {opt.state[p]["scale_invariant_view"] for p in ours}
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"step {step}")
    assert seen == {"channel", "layer", ""}, "every branch of the test must have been taken"


@pytest.mark.parametrize("kind", ["sgdp", "adamp"])
def test_matches_authors_package_on_a_normalized_cnn(kind):
    torch.manual_seed(0)
    net = BNCNN(channels=(4, 6)).double()
    twin = BNCNN(channels=(4, 6)).double()
    twin.load_state_dict(net.state_dict())
    hp = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4) if kind == "sgdp" else dict(
        lr=1e-2, weight_decay=1e-2)
    ours = (SGDP if kind == "sgdp" else AdamP)(net.parameters(), **hp)
    ref = getattr(adamp_ref, "SGDP" if kind == "sgdp" else "AdamP")(twin.parameters(), **hp)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        X = torch.rand(32, 784, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (32,), generator=g)
        for model, opt in ((net, ours), (twin, ref)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    for (name, a), b in zip(net.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8, msg=name)
    views = {n: ours.state[p]["scale_invariant_view"] for n, p in net.named_parameters()}
    assert views["1.weight"] == views["5.weight"] == "channel"  # the two convs before BatchNorm
    assert views["10.weight"] == ""  # the head feeds the loss directly


def test_projection_off_is_the_baseline():
    """With delta = 0 no tensor passes the test: SGDP is torch's SGD and AdamP is torch's AdamW."""
    for ours_kind, base_kind, hp in [
        ("sgdp", "sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
        ("adamp", "adamw", dict(lr=1e-2, weight_decay=0.05)),
    ]:
        g = torch.Generator().manual_seed(3)
        w0 = torch.randn(5, 7, generator=g, dtype=torch.float64)
        a, b = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        opt_a = make_optimizer(ours_kind, [a], delta=0.0, **hp)
        opt_b = make_optimizer(base_kind, [b], **hp)
        for _ in range(15):
            grad = _gradient(a.detach(), "channel", g)
            a.grad, b.grad = grad.clone(), grad.clone()
            opt_a.step()
            opt_b.step()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("opt_cls, hp", [(SGDP, dict(lr=0.1, momentum=0.9)),
                                         (AdamP, dict(lr=0.01))])
def test_state_dict_round_trip_continues_the_same_trajectory(opt_cls, hp):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    grads = [_gradient(w.detach(), "channel", g) for _ in range(6)]
    opt = opt_cls([w], **hp)
    for grad in grads[:3]:
        w.grad = grad.clone()
        opt.step()
    twin = w.detach().clone().requires_grad_(True)
    resumed = opt_cls([twin], **hp)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch would share the buffers
    for grad in grads[3:]:
        w.grad, twin.grad = grad.clone(), grad.clone()
        opt.step()
        resumed.step()
    torch.testing.assert_close(twin, w, rtol=0, atol=0)


def test_parameters_without_gradient_are_skipped():
    w, frozen = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    before = frozen.detach().clone()
    for opt in (SGDP([w, frozen], lr=0.1, momentum=0.9, weight_decay=0.1),
                AdamP([w, frozen], lr=0.1, weight_decay=0.1)):
        w.grad = torch.randn(4, 3)
        opt.step()
        assert torch.equal(frozen.detach(), before)
        assert frozen not in opt.state


def test_one_dimensional_tensors_take_the_base_update():
    """A 1-D tensor is never projected, even when its gradient is orthogonal to it."""
    for ours_kind, base_kind, hp in [
        ("sgdp", "sgd", dict(lr=0.1, momentum=0.9)),
        ("adamp", "adamw", dict(lr=0.1, weight_decay=0.1)),
    ]:
        a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
        b = a.detach().clone().requires_grad_(True)
        opt_a, opt_b = make_optimizer(ours_kind, [a], **hp), make_optimizer(base_kind, [b], **hp)
        for _ in range(5):
            grad = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)
            a.grad, b.grad = grad.clone(), grad.clone()
            opt_a.step()
            opt_b.step()
        assert opt_a.state[a]["scale_invariant_view"] == ""
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradient_parallel_to_the_weight_is_not_projected():
    w0 = torch.randn(3, 4, dtype=torch.float64)
    a, b = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    opt_a = SGDP([a], lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    a.grad, b.grad = 0.5 * w0.clone(), 0.5 * w0.clone()
    opt_a.step()
    opt_b.step()
    assert opt_a.state[a]["scale_invariant_view"] == ""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("opt_cls, hp", [(SGDP, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
                                         (AdamP, dict(lr=0.1, weight_decay=0.1, nesterov=True))])
def test_all_zero_weights_stay_finite(opt_cls, hp):
    w = torch.zeros(4, 5, requires_grad=True)
    opt = opt_cls([w], **hp)
    for _ in range(3):
        w.grad = torch.randn(4, 5)
        opt.step()
    assert torch.isfinite(w).all()
    assert w.abs().sum() > 0, "the step must still move an all-zero weight"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: SGDP(p, lr=-0.1), "lr must be a finite number >= 0"),
        (lambda p: SGDP(p, lr=float("nan")), "lr must be a finite number >= 0"),
        (lambda p: SGDP(p, lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda p: SGDP(p, lr=0.1, momentum=-0.5), r"momentum must be in \[0, 1\)"),
        (lambda p: SGDP(p, lr=0.1, nesterov=True), "Nesterov momentum needs momentum > 0"),
        (lambda p: SGDP(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
         "dampening = 0"),
        (lambda p: SGDP(p, lr=0.1, weight_decay=-1e-4), "weight_decay must be"),
        (lambda p: AdamP(p, eps=0.0), "eps must be a finite number > 0"),
        (lambda p: AdamP(p, betas=(0.9, 1.0)), r"betas must be a pair of numbers in \[0, 1\)"),
        (lambda p: AdamP(p, betas=(0.9,)), "betas must be a pair"),
        (lambda p: AdamP(p, delta=-0.1), "delta must be a finite number >= 0"),
        (lambda p: AdamP(p, wd_ratio=-1.0), "wd_ratio must be a finite number >= 0"),
    ],
)
def test_invalid_hyperparameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.zeros(2, 2, requires_grad=True)])


def test_invalid_param_group_is_refused_and_not_added():
    opt = AdamP([torch.zeros(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_refused():
    w = torch.zeros(3, 2, requires_grad=True)
    opt = SGDP([w], lr=0.1)
    w.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_projected_update_is_orthogonal_to_the_weight():
    """With momentum the buffer carries radial parts of old gradients; the applied step must not."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    for opt in (SGDP([w], lr=0.3, momentum=0.9), AdamP([w], lr=0.05)):
        for _ in range(10):
            w.grad = _gradient(w.detach(), "channel", g)
            before = w.detach().clone()
            opt.step()
            step = w.detach() - before
            w_hat = before / before.norm(dim=1, keepdim=True)
            radial = (w_hat * step).sum(dim=1).abs()
            assert opt.state[w]["scale_invariant_view"] == "channel"
            assert torch.all(radial < 1e-6 * step.norm(dim=1))
    # For contrast: Adam's first moment, which is never projected, has left the tangent space.
    m = opt.state[w]["exp_avg"]
    w_hat = w.detach() / w.detach().norm(dim=1, keepdim=True)
    assert float((w_hat * m).sum(dim=1).abs().max()) > 1e-2 * float(m.norm(dim=1).max())


def test_project_radial_and_view_selection():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    u = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    p = project_radial(w, u, "channel", eps=0.0)
    torch.testing.assert_close(p, torch.tensor([[0.16, -0.12], [1.0, 0.0]], dtype=torch.float64))
    assert scale_invariance_view(w, torch.tensor([[-4.0, 3.0], [1.0, 0.0]]).double(), 0.1,
                                 1e-8) == "channel"
    assert scale_invariance_view(w, w.clone(), 0.1, 1e-8) is None


def test_plain_gd_on_a_scale_invariant_toy_grows_the_norm_at_second_order():
    """||w_{t+1}||^2 - ||w_t||^2 = lr^2 ||g_t||^2 for GD without momentum or weight decay."""
    lr = 0.7
    w = torch.tensor([[0.3, -1.2, 0.5]], dtype=torch.float64, requires_grad=True)
    w_star = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=lr)
    for _ in range(30):
        opt.zero_grad()
        cosine_loss(w, w_star).sum().backward()
        before, grad = w.detach().clone(), w.grad.clone()
        opt.step()
        growth = w.detach().norm() ** 2 - before.norm() ** 2
        assert abs(float(growth - lr**2 * grad.norm() ** 2)) < 1e-8
        assert growth > 0


def test_toy_momentum_grows_the_norm_and_sgdp_holds_it():
    W0, w_star = toy_starts(5, seed=0)
    assert np.allclose(np.linalg.norm(W0, axis=1), 1.0)
    runs = {name: toy_run(kind, W0, w_star, lr=0.05, momentum=m, steps=200)
            for name, kind, m in [("gd", "sgd", 0.0), ("msgd", "sgd", 0.9),
                                  ("sgdp", "sgdp", 0.9)]}
    assert np.all(runs["msgd"].norm[-1] > runs["gd"].norm[-1])
    assert np.all(runs["sgdp"].norm[-1] < runs["msgd"].norm[-1])
    # Rows are independent runs: a single start gives the same trajectory as within the batch.
    single = toy_run("sgdp", W0[2], w_star, lr=0.05, momentum=0.9, steps=200)
    np.testing.assert_allclose(single.w[:, 0], runs["sgdp"].w[:, 2], atol=1e-12)
    assert runs["sgdp"].steps_to(1e-3).shape == (5,)


def test_toy_calibration_recovers_a_learning_rate():
    W0, w_star = toy_starts(4, seed=1)
    lr = calibrate_toy_lr(2.0, W0, w_star, momentum=0.9, steps=200, rtol=1e-3)
    med = np.median(toy_run("sgd", W0, w_star, lr=lr, momentum=0.9, steps=200).norm[-1])
    assert abs(med - 2.0) < 0.02
    with pytest.raises(ValueError, match="target_norm must be > 1"):
        calibrate_toy_lr(0.5, W0, w_star, momentum=0.9, steps=10)


def test_toy_input_errors():
    with pytest.raises(ValueError, match="non-zero"):
        toy_run("sgd", [[0.0, 0.0]], [1.0, 0.0], lr=0.1)
    with pytest.raises(ValueError, match="to match w"):
        toy_run("sgd", [[1.0, 0.0, 0.0]], [1.0, 0.0], lr=0.1)
    with pytest.raises(ValueError, match="compares 'sgd' and 'sgdp'"):
        toy_run("adam", [[1.0, 0.0]], [1.0, 0.0], lr=0.1)


def test_bn_preceded_weights_are_scale_invariant_and_the_head_is_not():
    torch.manual_seed(0)
    X = torch.rand(32, 784, dtype=torch.float64)
    for net, expected in [(BNMLP(hidden=(32, 16)).double(), ["0.weight", "3.weight"]),
                          (BNCNN(channels=(4, 8)).double(), ["1.weight", "5.weight"])]:
        names = [n for n, _ in bn_preceded_weights(net)]
        assert names == expected
        head = [n for n, p in net.named_parameters() if p.dim() > 1][-1]
        assert scale_invariance_gap(net, X, head, factor=3.0) > 1e-2
        for name in names:
            # BatchNorm's eps (1e-5, added to the variance) is the only break of invariance.
            assert scale_invariance_gap(net, X, name, factor=3.0) < 1e-3
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eps = 1e-14
        for name in names:
            assert scale_invariance_gap(net, X, name, factor=3.0) < 1e-9
        # The gradient of a BN-preceded weight is orthogonal to it, row by row.
        torch.nn.functional.cross_entropy(net(X), torch.randint(0, 10, (32,))).backward()
        params = dict(net.named_parameters())
        assert all(scale_invariance_view(params[n], params[n].grad, 0.1, 1e-8) == "channel"
                   for n in names)
    with pytest.raises(KeyError, match="no parameter"):
        scale_invariance_gap(net, X, "missing.weight")


def test_models_refuse_bad_shapes():
    with pytest.raises(ValueError, match="at least one hidden layer"):
        BNMLP(hidden=())
    with pytest.raises(ValueError, match="model must be 'mlp' or 'cnn'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="shrink a 28-pixel image"):
        BNCNN(channels=(2,) * 6)


def test_tracker_and_training_record_norm_growth():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    Xtr, ytr = torch.rand(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g)
    net = BNMLP(hidden=(32, 32))
    opt = make_optimizer("sgd", net.parameters(), lr=0.2, momentum=0.9)
    res = train_normalized(net, opt, Xtr, ytr, Xtr[:64], ytr[:64], epochs=3, batch_size=32,
                           seed=0)
    assert len(res.norm_mean) == len(res.test_acc) == len(res.eff_step_mean) == 4
    assert res.norm_ratio > 1 and math.isnan(res.invariant_fraction)
    assert res.eff_step_mean[-1] == 0.0  # the cosine schedule ends at lr = 0
    with pytest.raises(ValueError, match="no weights to track"):
        NormTracker([], opt)
    with pytest.raises(ValueError, match="norms > 0"):
        effective_step_size(0.1, [1.0, 0.0])


def test_compare_optimizers_pairs_by_seed_and_checks_inputs():
    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 256, (200, 784)).astype(np.uint8), np.repeat(np.arange(10), 20)
    configs = {"sgdp": dict(kind="sgdp", lr=0.1, momentum=0.9),
               "sgdp_again": dict(kind="sgdp", lr=0.1, momentum=0.9)}
    runs = compare_optimizers(configs, X, y, seeds=[0, 1], hidden=(16,), epochs=1,
                              batch_size=32, progress=False)
    assert [r.norm_mean for r in runs["sgdp"]] == [r.norm_mean for r in runs["sgdp_again"]]
    assert runs["sgdp"][0].invariant_fraction > 0.5
    with pytest.raises(ValueError, match="'kind' must be one of"):
        compare_optimizers({"x": dict(kind="lamb")}, X, y, seeds=[0], epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="NaN"):
        compare_optimizers(configs, np.full((20, 784), np.nan), y[:20], seeds=[0], epochs=1,
                           batch_size=8)
    with pytest.raises(ValueError, match="optimizer kind must be one of"):
        make_optimizer("rmsprop", [torch.zeros(2, requires_grad=True)], lr=0.1)
