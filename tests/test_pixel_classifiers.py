"""GMMSeg and ProtoSeg against references written with loops (what their official code computes,
re-derived element by element; nothing from cac.core.components, gmmseg or protoseg), in float64, at
ordinary and at confident features, over several training steps: every loss term, the logits, the
component targets, the state after each step and the gradients. The official code itself was run
beside them by benchmarks/official_classifiers.py (docs/classifiers.md); it is not in this repository."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cac.core.components import sinkhorn
from cac.core.gmmseg import GMMSegClassifier, GMMSegOptions, diagonal_gaussian_log_density
from cac.core.protoseg import ProtoSegClassifier, ProtoSegOptions

torch.set_default_dtype(torch.float32)
IGNORE = 255


# ---- references written with loops ---------------------------------------------------------------
def ref_sinkhorn(scores: torch.Tensor, iterations: int = 3, eps: float = 0.05) -> torch.Tensor:
    """Python floats: exp, total to 1, then per round each component's row to 1/M, each pixel's column
    to 1/n; finally each pixel's column scaled to 1."""
    n, m = scores.shape
    q = [[math.exp(float(scores[i, j]) / eps) for i in range(n)] for j in range(m)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(m):
            s = sum(q[j])
            q[j] = [v / s / m for v in q[j]]
        for i in range(n):
            s = sum(q[j][i] for j in range(m))
            for j in range(m):
                q[j][i] = q[j][i] / s / n
    return torch.tensor([[q[j][i] * n for j in range(m)] for i in range(n)], dtype=torch.float64)


def ref_layer_norm(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        var = sum((v - mean) ** 2 for v in row) / len(row)
        out.append(torch.stack([(row[d] - mean) / torch.sqrt(var + 1e-5) * weight[d] + bias[d] for d in range(len(row))]))
    return torch.stack(out)


def ref_l2(rows: torch.Tensor) -> torch.Tensor:
    return torch.stack([row / torch.clamp(torch.sqrt(sum(v * v for v in row)), min=1e-12) for row in rows])


def ref_pixels(x: torch.Tensor) -> torch.Tensor:
    """``[B, D, h, w]`` -> ``[B*h*w, D]`` in (b, y, x) order, by loops."""
    b, d, h, w = x.shape
    return torch.stack([x[i, :, y, xx] for i in range(b) for y in range(h) for xx in range(w)])


def ref_small_labels(labels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Legacy nearest: output (y, x) takes input (floor(y H/h), floor(x W/w))."""
    b, big_h, big_w = labels.shape
    return torch.tensor([int(labels[i, (y * big_h) // h, (x * big_w) // w]) for i in range(b) for y in range(h)
                         for x in range(w)])


def ref_log_density(z: torch.Tensor, means: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    d = z.shape[1]
    rows = []
    for n in range(z.shape[0]):
        row = []
        for j in range(means.shape[0]):
            quad = sum(((z[n, k] - means[j, k]) / sigma[j, k]) ** 2 for k in range(d))
            row.append(-0.5 * d * math.log(2 * math.pi) - sum(torch.log(sigma[j, k]) for k in range(d)) - 0.5 * quad)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_class_logits(comps: torch.Tensor, classes: int, norm: torch.nn.LayerNorm) -> torch.Tensor:
    m = comps.shape[1] // classes
    best = torch.stack([torch.stack([max(comps[n, k * m:(k + 1) * m], key=float) for k in range(classes)])
                        for n in range(comps.shape[0])])
    return ref_layer_norm(best, norm.weight, norm.bias)


def ref_assign(comps, gt, correct, classes, scale_by_max, picks=None):
    """Per present class, ascending: Sinkhorn on its pixels' scores over its components; target
    k*M + argmax; update one-hot (or ``picks[k]`` for each of its pixels) times correct."""
    n, m = comps.shape[0], comps.shape[1] // classes
    targets, update = gt.clone(), torch.zeros(n, m, dtype=torch.float64)
    for k in sorted({int(v) for v in gt.tolist()} - {IGNORE}):
        idx = [i for i in range(n) if int(gt[i]) == k]
        scores = torch.stack([comps[i, k * m:(k + 1) * m].detach() for i in idx])
        if scale_by_max:
            scores = scores / scores.abs().max()
        plan = ref_sinkhorn(scores)
        for row, i in enumerate(idx):
            best = max(range(m), key=lambda j: plan[row, j])
            targets[i] = k * m + best
            choice = best if picks is None else picks[k][row]
            update[i, choice] = 1.0 if bool(correct[i]) else 0.0
    return targets, update


def ref_ce(logits_rows: torch.Tensor, targets: torch.Tensor, valid) -> torch.Tensor:
    terms = [torch.logsumexp(logits_rows[i], 0) - logits_rows[i, int(targets[i])]
             for i in range(len(targets)) if valid(i)]
    return sum(terms) / len(terms)


def features_and_labels(gen, b, d, h, w, classes, confident=None):
    labels = torch.randint(0, classes, (b, h, w), generator=gen)
    labels[:, : max(1, h // 3)] %= 2
    big = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    big[:, :, :4] = IGNORE  # an ignored band
    feats = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
    if confident is not None:  # each pixel near a direction of its class: confident scores
        feats = confident[labels].permute(0, 3, 1, 2) * 4.0 + 0.02 * feats
    return feats, big


# ---- the shared pieces ------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_sinkhorn_is_the_loop_written_equipartition(scale):
    """Ordinary scores, and saturated ones (a scale of 20 puts exp(score / 0.05) at its extremes)."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.tanh(scale * torch.randn(9, 4, generator=gen, dtype=torch.float64))
    ours, ref = sinkhorn(scores), ref_sinkhorn(scores)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ours.sum(1), torch.ones(9, dtype=torch.float64))  # each pixel's plan sums to 1


def test_gaussian_log_density_and_its_gradient_are_the_loop_written_formula():
    """The expanded square equals the direct formula, at ordinary pixels and at pixels on a mean with
    small σ (log-densities near their largest), and so does the gradient."""
    gen = torch.Generator().manual_seed(1)
    means = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=-1)
    sigma = 0.1 + torch.rand(6, 5, generator=gen, dtype=torch.float64)
    ordinary = F.normalize(torch.randn(4, 5, generator=gen, dtype=torch.float64), dim=-1)
    confident = means[:4] + 1e-4 * torch.randn(4, 5, generator=gen, dtype=torch.float64)
    for z in (ordinary, confident):
        z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        ours, ref = diagonal_gaussian_log_density(z1, means, sigma), ref_log_density(z2, means, sigma)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-9)
        up = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
        g1, = torch.autograd.grad((ours * up).sum(), z1)
        g2, = torch.autograd.grad((ref * up).sum(), z2)
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)


# ---- GMMSeg, step by step ---------------------------------------------------------------------
def ref_gmmseg_step(state, feats, labels, ln, mn, options, classes):
    """One official training step written out: logits, log-densities, targets, the contrast loss,
    then the memory (evenly spaced picks, ring buffer) and, on every ``update_interval``-th step, EM."""
    means, sigma, queue, ptr, step = state
    m, d = options.num_components, feats.shape[1]
    b, _, h, w = feats.shape
    z = ref_l2(ref_layer_norm(ref_pixels(feats), ln.weight, ln.bias))
    means = ref_l2(means.view(-1, d)).view(classes, m, d)  # renormalised in place by the forward
    comps = ref_log_density(z, means.view(-1, d), sigma.view(-1, d))
    logits = ref_class_logits(comps, classes, mn)
    gt = ref_small_labels(labels, h, w)
    correct = torch.tensor([int(torch.argmax(logits[i])) == int(gt[i]) for i in range(len(gt))])
    targets, update = ref_assign(comps, gt, correct, classes, scale_by_max=True)
    contrast = ref_ce(comps, targets, lambda i: int(targets[i]) != IGNORE) * options.contrast_weight
    queue, ptr = queue.clone(), ptr.clone()
    present = sorted({int(v) for v in gt.tolist()} - {IGNORE})
    size = queue.shape[-1]
    with torch.no_grad():
        for k in present:
            for c in range(m):
                chosen = [z[i].detach() for i in range(len(gt)) if int(gt[i]) == k and update[i, c] > 0]
                if not chosen:
                    continue
                s = options.max_sample_size
                if len(chosen) > s:
                    chosen = [chosen[(i * (len(chosen) - 1)) // (s - 1)] for i in range(s)]
                row = k * m + c
                for v in chosen:
                    queue[row, :, int(ptr[row])] = v
                    ptr[row] = (int(ptr[row]) + 1) % size
        new_means, new_sigma = means.clone(), sigma.clone()
        if step % options.update_interval == 0:
            for k in present:
                for c in range(m):
                    mem = [queue[k * m + c, :, s] for s in range(size)]
                    total = sum(mem)
                    f = total / torch.clamp(torch.sqrt(sum(v * v for v in total)), min=1e-12)
                    new_means[k, c] = options.gamma_mean * means[k, c] + (1 - options.gamma_mean) * f
                    var = torch.stack([sum((mem[s][dd] - f[dd]) ** 2 for s in range(size)) / size for dd in range(d)])
                    new_sigma[k, c] = torch.sqrt(var + options.variance_floor)
    p = logits.view(b, h, w, classes).permute(0, 3, 1, 2)
    return p, comps, targets, contrast, (new_means, new_sigma, queue, ptr, step + 1)


@pytest.mark.parametrize("confident", [False, True], ids=["ordinary", "confident"])
def test_gmmseg_training_steps_are_the_loop_written_method(confident):
    classes, m, d, size = 4, 3, 5, 9
    options = GMMSegOptions(embed_dim=d, num_components=m, mem_size=size, max_sample_size=3, update_interval=2)
    torch.manual_seed(0)
    ours = GMMSegClassifier(d, classes, options).double().train()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ours.mask_norm.bias.copy_(0.2 * torch.randn(classes, generator=gen, dtype=torch.float64))
        if confident:  # zero-mean means, an identity LayerNorm: a pixel at a mean is that mean after it
            ours.means.copy_(F.normalize(ours.means - ours.means.mean(-1, keepdim=True), dim=-1))
        else:
            ours.feat_norm.weight.copy_(1 + 0.2 * torch.randn(d, generator=gen, dtype=torch.float64))
    direction = ours.means[:, 0].clone() if confident else None  # each pixel at its class's first Gaussian
    state = (ours.means.clone(), ours.sigma.clone(), ours.queue.clone(), ours.queue_ptr.clone(), 0)
    for step in range(5):  # the memory wraps (9 slots, up to 3 a component a step), EM at steps 0, 2, 4
        feats, labels = features_and_labels(gen, 2, d, 3, 4, classes, direction)
        x1, x2 = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        out = ours(x1, labels=labels)
        mine = ours.losses(out, labels, lambda logits, _acc: {})["loss_contrast"]
        p, comps, targets, contrast, state = ref_gmmseg_step(state, x2, labels, ours.feat_norm, ours.mask_norm,
                                                            options, classes)
        torch.testing.assert_close(out.p, p, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.components, comps, rtol=1e-9, atol=1e-9)
        assert torch.equal(out.targets, targets)
        torch.testing.assert_close(mine, contrast, rtol=1e-9, atol=1e-12)
        loss_ours = mine + out.p.pow(2).mean()  # a term through the logits too: their gradient path
        loss_ref = contrast + p.pow(2).mean()
        wrt_ours = [x1, ours.feat_norm.weight, ours.feat_norm.bias, ours.mask_norm.weight, ours.mask_norm.bias]
        g1 = torch.autograd.grad(loss_ours, wrt_ours)
        g2 = torch.autograd.grad(loss_ref, [x2, ours.feat_norm.weight, ours.feat_norm.bias, ours.mask_norm.weight,
                                            ours.mask_norm.bias])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        means, sigma, queue, ptr, count = state
        torch.testing.assert_close(ours.queue, queue, rtol=0, atol=1e-12)
        assert torch.equal(ours.queue_ptr, ptr) and int(ours.step) == count
        torch.testing.assert_close(ours.means, means, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.sigma, sigma, rtol=1e-10, atol=1e-12)
    assert int(ours.queue_ptr.max()) > 0 and not torch.equal(ours.sigma, torch.ones_like(ours.sigma))


# ---- ProtoSeg, step by step -------------------------------------------------------------------
def ref_protoseg_step(protos, feats, labels, proj, ln, mn, options, classes, picks):
    m = options.num_prototypes
    b, _, h, w = feats.shape
    x = proj(feats)
    if options.proj_norm == "width":  # each (image, channel, row): unit length along x
        x = torch.stack([torch.stack([torch.stack([row / torch.clamp(row.norm(), min=1e-12) for row in chan])
                                      for chan in img]) for img in x])
    else:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = ref_l2(ref_layer_norm(ref_pixels(x), ln.weight, ln.bias))
    d = z.shape[1]
    protos = ref_l2(protos.view(-1, d)).view(classes, m, d)
    comps = torch.stack([torch.stack([sum(z[n, e] * protos[k, j, e] for e in range(d)) for k in range(classes)
                                      for j in range(m)]) for n in range(z.shape[0])])
    logits = ref_class_logits(comps, classes, mn)
    gt = ref_small_labels(labels, h, w)
    correct = torch.tensor([int(torch.argmax(logits[i])) == int(gt[i]) for i in range(len(gt))])
    targets, update = ref_assign(comps, gt, correct, classes, scale_by_max=False, picks=picks)
    valid = lambda i: int(gt[i]) != IGNORE  # noqa: E731
    ppc = ref_ce(comps, targets, valid) * options.ppc_weight
    dist = [(1 - comps[i, int(targets[i])]) ** 2 for i in range(len(gt)) if valid(i)]
    ppd = sum(dist) / len(dist) * options.ppd_weight
    new = protos.detach().clone()
    with torch.no_grad():
        for k in sorted({int(v) for v in gt.tolist()} - {IGNORE}):
            idx = [i for i in range(len(gt)) if int(gt[i]) == k]
            for j in range(m):
                members = [z[i].detach() for i in idx if update[i, j] > 0]
                if members:
                    total = sum(members)
                    new[k, j] = options.gamma * new[k, j] + (1 - options.gamma) * total / total.norm()
        new = ref_l2(new.view(-1, d)).view(classes, m, d)
    return logits.view(b, h, w, classes).permute(0, 3, 1, 2), comps, targets, ppc, ppd, new


def gumbel_picks(ours_forward, seed):
    """The prototypes the official Gumbel-softmax picks, recorded from the draws our run makes (the
    same seed gives the reference the same sample)."""
    recorded = {}
    real = F.gumbel_softmax

    def record(plan, tau=1.0, hard=False, **kw):
        out = real(plan, tau=tau, hard=hard, **kw)
        recorded[len(recorded)] = out.argmax(1).tolist()
        return out

    F.gumbel_softmax = record
    try:
        torch.manual_seed(seed)
        result = ours_forward()
    finally:
        F.gumbel_softmax = real
    return result, recorded


@pytest.mark.parametrize("profile", ["official", "paper"])
@pytest.mark.parametrize("confident", [False, True], ids=["ordinary", "confident"])
def test_protoseg_training_steps_are_the_loop_written_method(profile, confident):
    """The official profile (projection normalised along the width, the update's assignment a Gumbel
    sample, here replayed from the draws) and the paper's (per pixel, the plan's argmax)."""
    classes, m, d = 4, 3, 6
    options = ProtoSegOptions.from_dict({"profile": profile, "num_prototypes": m})
    torch.manual_seed(0)
    ours = ProtoSegClassifier(d, classes, options).double().train()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ours.feat_norm.bias.copy_(0.2 * torch.randn(d, generator=gen, dtype=torch.float64))
        ours.mask_norm.weight.copy_(1 + 0.2 * torch.randn(classes, generator=gen, dtype=torch.float64))
    direction = torch.randn(classes, d, generator=gen, dtype=torch.float64) if confident else None
    protos = ours.prototypes.clone()
    for step in range(4):
        feats, labels = features_and_labels(gen, 2, d, 3, 4, classes, direction)
        x1, x2 = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        out, draws = gumbel_picks(lambda: ours(x1, labels=labels), seed=step)
        present = sorted({int(v) for v in labels[:, ::4, ::4].flatten().tolist()} - {IGNORE})
        picks = {k: draws[i] for i, k in enumerate(present)} if profile == "official" else None
        mine = ours.losses(out, labels, lambda logits, _acc: {})
        p, comps, targets, ppc, ppd, protos = ref_protoseg_step(protos, x2, labels, ours.proj, ours.feat_norm,
                                                               ours.mask_norm, options, classes, picks)
        torch.testing.assert_close(out.p, p, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.components, comps, rtol=1e-9, atol=1e-10)
        assert torch.equal(torch.where(out.valid, out.targets, torch.full_like(out.targets, IGNORE)), targets)
        torch.testing.assert_close(mine["loss_ppc"], ppc, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(mine["loss_ppd"], ppd, rtol=1e-9, atol=1e-14)
        params = [ours.proj[0].weight, ours.proj[2].weight, ours.feat_norm.weight, ours.mask_norm.bias]
        g1 = torch.autograd.grad(mine["loss_ppc"] + mine["loss_ppd"] + out.p.pow(2).mean(), [x1] + params)
        g2 = torch.autograd.grad(ppc + ppd + p.pow(2).mean(), [x2] + params)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(ours.prototypes, protos, rtol=1e-10, atol=1e-12)


# ---- state: checkpoints, evaluation, AMP -------------------------------------------------------
@pytest.mark.parametrize("kind", ["gmmseg", "protoseg"])
def test_state_is_in_the_checkpoint_untouched_by_evaluation_and_float32_under_amp(kind):
    from cac.core.classifiers import build_classifier

    cfg = {"type": kind, **({"mem_size": 11, "max_sample_size": 4, "update_interval": 1} if kind == "gmmseg" else {})}
    torch.manual_seed(0)
    model = build_classifier(cfg, 8, 5).train()
    gen = torch.Generator().manual_seed(4)
    feats, labels = features_and_labels(gen, 2, 8, 4, 4, 5)
    feats = feats.float()
    for _ in range(3):
        model(feats, labels=labels)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k for k, _ in model.named_buffers()} - {k for k in state if "running" in k or "num_batches" in k}
    assert buffers and buffers <= set(state)  # the method's state is saved with the weights
    restored = build_classifier(cfg, 8, 5)
    restored.load_state_dict(state)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(feats).p, model(feats).p, rtol=0, atol=0)
    # a forward renormalises the stored directions (the official code does, each time): the state as
    # the evaluation sees it, then labels at evaluation (the three-classifier pass gives them) change
    # nothing (but a rounding of those directions; an update would move them by 1e-3)
    seen = {k: v.clone() for k, v in model.state_dict().items()}
    model(feats, labels=labels)
    assert all(torch.allclose(model.state_dict()[k].double(), seen[k].double(), rtol=0, atol=1e-6) for k in buffers)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(feats, labels=labels)
    assert all(getattr(model, k.split(".")[-1]).dtype in (torch.float32, torch.long) for k in buffers)
    assert torch.isfinite(out.p).all() and not all(torch.equal(model.state_dict()[k], state[k]) for k in buffers)


def test_a_spec_row_names_another_classifier_and_refuses_mixtures(tmp_path):
    from cac.exp.spec import SpecError, load_spec

    def spec(rows: str, extra: str = "") -> "object":
        (tmp_path / "s.yaml").write_text(f"title: t\nmodel: fcn-slim-r18\n{extra}rows:\n{rows}")
        return load_spec(tmp_path / "s.yaml")

    s = spec("  - {label: g, description: g, classifier: {type: GMMSeg, num_components: 2}}\n"
             "  - {label: p, description: p, classifier: {type: protoseg}, presets: [paper]}\n",
             "presets: {quick: {classifier: {gmmseg: {mem_size: 50, num_components: 7}}}}\n")
    g, p = s.rows
    assert g.cac is None and g.kind == "gmmseg" and s.classifier_for(g, "quick") == {
        "mem_size": 50, "num_components": 2, "type": "gmmseg"}  # the row's own options win
    assert [r.label for r in s.rows_for("quick")] == ["g"] and [r.label for r in s.rows_for("paper")] == ["g", "p"]
    from analysis.tables import explain_metrics_markdown

    # a report at a preset lists the rows that exist there, not a paper-only one as "no runs"
    listed = [line.split("|")[1].strip() for line in explain_metrics_markdown(s, {}, "quick").splitlines()
              if line.startswith("| ")][1:]
    assert listed == ["g"] and "| p |" in explain_metrics_markdown(s, {}, "paper")
    from cac.exp.runner import make_unit

    unit = make_unit(s, g, 0, "quick")  # what trains is what the run logs as its settings
    assert unit.cfg["model"]["decode_head"]["classifier"] == {"type": "gmmseg", "mem_size": 50, "num_components": 2}
    settings = unit.settings()
    assert settings["classifier"] == "gmmseg" and settings["gmmseg.mem_size"] == 50
    assert settings["gmmseg.num_components"] == 2
    for rows, words in [
        ("  - {label: x, description: x, classifier: {type: nosuch}}\n", "unknown classifier type 'nosuch'"),
        ("  - {label: x, description: x, cac: true, classifier: {type: gmmseg}}\n", "not both"),
        ("  - {label: x, description: x, classifier: {type: gmmseg, bogus: 1}}\n", "unknown gmmseg option"),
        ("  - {label: x, description: x, classifier: {type: protoseg, proj_norm: rows}}\n", "proj_norm"),
        ("  - {label: x, description: x, classifier: {type: cac}}\n", "`cac:` key"),
        ("  - {label: x, description: x, cac: false, presets: [huge]}\n", "presets"),
    ]:
        with pytest.raises(SpecError, match=words):
            spec(rows)
