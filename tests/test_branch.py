"""Branch rewrite: channel spaces and permutations consistent across residual adds
(before/expected TVMScript), a plan with every sync point kept equals the original, the split
of a branch plan sends bytes only at sync points, and distillation through the torch view
of the module recovers the teacher."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc import frontend
from splitc.backend.torch_program import TorchProgram
from splitc.errors import SplitcError
from splitc.passes.split.branch import (
    BranchRewrite,
    analyse,
    branch_devices,
    channel_axes,
    hints,
    keep_where_cuts_hurt,
    plan_branches,
    sync_candidates,
)
from splitc.passes.split.channel import ChannelSplit, plan_channel
from splitc.planning.cluster import Cluster
from splitc.planning.distill import cut_losses, distill, logits_var, reconstruct
from splitc.planning.extract import extract
from splitc.planning.strategies.branch import branch_split

from .helpers import one_per_row, run_module

RNG = np.random.default_rng(0)
BIG, SMALL = 1.0, 0.01
# w2 couples channels of equal parity, so the best 2-way partition of the residual stream is
# {0, 2} | {1, 3}; w3 makes the model's output (the head: whole, on device 0)
W1 = RNG.standard_normal((4, 4, 1, 1)).astype("float32")
B1 = RNG.standard_normal((1, 4, 1, 1)).astype("float32")
W2 = np.fromfunction(lambda o, i, h, w: np.where(o % 2 == i % 2, BIG, SMALL),
                     (4, 4, 3, 3)).astype("float32")
W3 = np.fromfunction(lambda o, i, h, w: np.where(o // 2 == i % 2, BIG, SMALL),
                     (4, 4, 1, 1)).astype("float32")


def bind(mod, **arrays) -> tvm.IRModule:
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v)
                                               for k, v in arrays.items()})(mod)


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 4, 6, 6), "float32"), w1: R.Tensor((4, 4, 1, 1), "float32"),
             b1: R.Tensor((1, 4, 1, 1), "float32"), w2: R.Tensor((4, 4, 3, 3), "float32"),
             w3: R.Tensor((4, 4, 1, 1), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            a = R.nn.conv2d(x, w1)
            b = R.add(a, b1)
            r = R.nn.relu(b)
            c = R.nn.conv2d(r, w2, padding=[1, 1, 1, 1])
            d = R.add(c, r)  # the residual: c, r (and b, a, d) share one channel space
            e = R.nn.conv2d(d, w3)
            R.output(e)
        return e


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 4, 6, 6), "float32"), w1_0: R.Tensor((2, 4, 1, 1), "float32"),
             w1_1: R.Tensor((2, 4, 1, 1), "float32"), b1_0: R.Tensor((1, 2, 1, 1), "float32"),
             b1_1: R.Tensor((1, 2, 1, 1), "float32"), w2_0: R.Tensor((2, 2, 3, 3), "float32"),
             w2_1: R.Tensor((2, 2, 3, 3), "float32"), order: R.Tensor((4,), "int64"),
             w3: R.Tensor((4, 4, 1, 1), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            a_b0 = R.nn.conv2d(x, w1_0)   # branch 0: channels 1 and 3 of every tensor
            a_b1 = R.nn.conv2d(x, w1_1)   # branch 1: channels 0 and 2
            b_b0 = R.add(a_b0, b1_0)      # the bias sliced with them
            b_b1 = R.add(a_b1, b1_1)
            r_b0 = R.nn.relu(b_b0)
            r_b1 = R.nn.relu(b_b1)
            c_b0 = R.nn.conv2d(r_b0, w2_0, padding=[1, 1, 1, 1])  # cut: its diagonal block
            c_b1 = R.nn.conv2d(r_b1, w2_1, padding=[1, 1, 1, 1])
            d_b0 = R.add(c_b0, r_b0)      # the residual stays in each branch
            d_b1 = R.add(c_b1, r_b1)
            d_g0 = R.concat((d_b0, d_b1), axis=1)  # the head gathers (on device 0) ...
            d_o0 = R.take(d_g0, order, axis=1, mode="fast")  # ... in the original order
            e = R.nn.conv2d(d_o0, w3)
            e_out = e
            R.output(e_out)
        return e_out


def before() -> tvm.IRModule:
    return bind(Before, w1=W1, b1=B1, w2=W2, w3=W3)


def test_partition_follows_the_weights_and_the_residual_add():
    ana = analyse(before(), 2)
    # one class per channel through the residual add: a, b, r, c, d partitioned alike
    branches = {v: tuple(ana.branches(v)) for v in "abcdr"}
    assert len(set(branches.values())) == 1
    got = branches["r"]
    assert got[0] == got[2] != got[1] == got[3]  # w2 couples channels of equal parity
    assert not ana.structure.parts("e")  # the model's output: the head, whole on device 0
    cands = {c.layer: c for c in sync_candidates(ana)}
    assert set(cands) == {"c"}
    # with the chosen partition only the SMALL couplings fall outside the blocks
    assert cands["c"].dropped_mass == pytest.approx(8 * SMALL / (8 * SMALL + 8 * BIG), rel=1e-5)


def test_channels_that_fire_together_share_a_branch():
    """No signal in the weights (all equal); on calibration data channels 0 and 3 of the
    residual stream fire together, and 1 and 2: co-firing decides the partition."""
    mod = bind(Before, w1=W1, b1=B1, w2=np.ones_like(W2), w3=np.ones_like(W3))
    a, b = RNG.standard_normal((2, 64, 1, 6, 6)).astype("float32")
    r = np.concatenate([a, b, b * 2 + 1, a * 3], axis=1)
    samples = {"r": np.moveaxis(r, 1, -1).reshape(-1, 4)}
    got = analyse(mod, 2, samples=samples).branches("r")
    assert got[0] == got[3] != got[1] == got[2]


def test_channel_samples_are_rows_of_the_values_and_keep_to_the_cap():
    """The co-firing samples of a partitioned tensor are its channel vectors at evenly spaced
    examples and positions, a chunk of examples at a time, at most about ``rows`` of them;
    no more than what ``analyse`` reads is kept."""
    model = frontend.load("resnet18", tiny=True)
    program = TorchProgram(model.mod)
    x = np.random.default_rng(1).standard_normal((10, 3, 32, 32)).astype("float32")
    axes = channel_axes(model.mod, 2)
    samples = program.channel_samples(x, axes, limit=6, rows=100, chunk=4)
    assert set(samples) == set(axes)
    with torch.no_grad():
        env = program.run(torch.from_numpy(x[:6]))
    for var, axis in axes.items():
        full = env[var].movedim(axis, -1).reshape(-1, env[var].shape[axis]).numpy()
        got = samples[var]
        assert got.shape[1] == full.shape[1] and 2 <= len(got) <= 100 + 2, var
        # every sample is one of the tensor's channel vectors on those six examples
        # (to rounding: the chunks are other batch sizes than the one run here)
        nearest = np.abs(got[:, None, :] - full[None, :, :]).max(axis=2).min(axis=1)
        assert nearest.max() <= 1e-5 * (np.abs(full).max() + 1), var


def test_rewrite_before_expected():
    plan = plan_branches(before(), 2, "none")
    assert plan.branched == {"c"}
    # channels of equal parity share a branch (which is called 0 is the partition's choice)
    [labels] = {plan.branches[v] for v in "abcdr"}
    assert labels in {(1, 0, 1, 0), (0, 1, 0, 1)}
    b0, b1 = ([1, 3], [0, 2]) if labels == (1, 0, 1, 0) else ([0, 2], [1, 3])
    expected = bind(Expected, w1_0=W1[b0], w1_1=W1[b1], b1_0=B1[:, b0], b1_1=B1[:, b1],
                    w2_0=W2[b0][:, b0], w2_1=W2[b1][:, b1],
                    order=np.argsort(b0 + b1).astype("int64"), w3=W3)
    tvm.ir.assert_structural_equal(BranchRewrite(plan)(before()), expected)
    # branch k on device k, the head on device 0
    devices = branch_devices(before(), plan)
    assert {n: d for n, d in devices.items() if n.endswith("_b1")} == {
        "a_b1": 1, "b_b1": 1, "r_b1": 1, "c_b1": 1, "d_b1": 1}
    assert devices["e"] == devices["d_g0"] == 0


def test_every_sync_point_kept_equals_the_original():
    mod = before()
    x = RNG.standard_normal((1, 4, 6, 6)).astype("float32")
    plan = plan_branches(mod, 2, "all")
    assert plan.branched == frozenset()
    np.testing.assert_allclose(run_module(BranchRewrite(plan)(mod), x), run_module(mod, x),
                               rtol=1e-5, atol=1e-5)


def test_a_plan_round_trips_through_json_and_bad_sync_names_are_refused():
    plan = plan_branches(before(), 2, set())
    assert plan.branched == {"c"}
    assert type(plan).from_json(plan.to_json()) == plan
    with pytest.raises(SplitcError, match="not branch candidates: zz"):
        plan_branches(before(), 2, {"zz"})


# the default run takes one K per model in turn; -m slow runs the rest
@pytest.mark.parametrize("name, k", one_per_row(["resnet18", "resnext50_32x4d",
                                                 "mobilenet_v2"], [2, 4]))
def test_zoo_branch_plans(name, k):
    """Every sync point kept: the original's answer. None kept: the split sends at most a
    tenth of the channel-parallel bytes."""
    model = frontend.load(name, tiny=True)
    x = model.random_inputs(seed=0)
    ana = analyse(model.mod, k)
    exact = BranchRewrite(plan_branches(model.mod, k, "all", analysis=ana))(model.mod)
    ref = model.reference(x)[0]
    got = run_module(exact, *x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    none = plan_branches(model.mod, k, "none", analysis=ana)
    cut = BranchRewrite(none)(model.mod)
    branch_bytes = extract(branch_split(model.mod, none)).transfer_bytes
    channel_bytes = extract(ChannelSplit(plan_channel(model.mod, k))(model.mod)).transfer_bytes
    assert branch_bytes <= 0.1 * channel_bytes, (branch_bytes, channel_bytes)
    # the torch view computes what TVM computes
    with torch.no_grad():
        view = TorchProgram(cut)(*[torch.from_numpy(a) for a in x])[0].numpy()
    np.testing.assert_allclose(view, run_module(cut, *x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # (distillation: the CLI test below distils in the default run)
def test_distillation_recovers_the_teacher():
    model = frontend.load("resnet18", tiny=True)
    cut = BranchRewrite(plan_branches(model.mod, 2, "none"))(model.mod)
    x = np.random.default_rng(1).standard_normal((400, 3, 32, 32)).astype("float32")
    teacher, student = TorchProgram(model.mod), TorchProgram(cut)
    probe = torch.from_numpy(x[:64])

    def distance() -> float:  # (a random teacher's top-1 hardly depends on its input: its
        with torch.no_grad():  # logits are compared, not only their argmax)
            return float((student(probe)[0] - teacher(probe)[0]).abs().mean())

    far = distance()
    report = distill(teacher, student, x, epochs=8, log=lambda _m: None)
    assert report.after >= max(0.9, report.before), report
    assert distance() < 0.8 * far  # closer to the teacher after distillation
    trained = student.to_module()
    with torch.no_grad():
        want = student(torch.from_numpy(x[:1]))[0].numpy()
    np.testing.assert_allclose(run_module(trained, x[:1]), want, rtol=1e-4, atol=1e-5)


def test_a_diverging_distillation_starts_the_epoch_again_at_half_the_rate():
    """A learning rate the student cannot take (the loss shoots up within a few steps): each
    time, the epoch starts again from its first weights at half the rate, said in the log,
    until it trains; the weights kept are never worse on the held-out split than the start."""
    model = frontend.load("resnet18", tiny=True)
    plan = plan_branches(model.mod, 2, "none")
    teacher, student = TorchProgram(model.mod), TorchProgram(BranchRewrite(plan)(model.mod))
    x = np.random.default_rng(5).standard_normal((80, 3, 32, 32)).astype("float32")
    said: list[str] = []
    report = distill(teacher, student, x, epochs=2, lr=50.0, batch=16, log=said.append)
    again = [m for m in said if "again from the epoch's first weights" in m]
    assert again and report.final_lr == pytest.approx(50.0 / 2 ** len(again)), said
    assert all(np.isfinite(v.detach().numpy()).all() for v in student.weights.values())
    assert report.after >= report.before
    # a rate it takes: no restart
    said.clear()
    student = TorchProgram(BranchRewrite(plan)(model.mod))
    report = distill(teacher, student, x, epochs=1, lr=1e-4, batch=16, log=said.append)
    assert report.final_lr == 1e-4 and not any("again" in m for m in said), said
    # a student equal to its teacher (every sync point kept) starts at a loss of about 0:
    # what it drifts to from there is no divergence
    exact = TorchProgram(BranchRewrite(plan_branches(model.mod, 2, "all"))(model.mod))
    report = distill(teacher, exact, x, epochs=1, batch=16, log=said.append)
    assert report.final_lr == 2e-3 and not any("again" in m for m in said), said


def test_refit_of_the_cut_layers_brings_the_student_to_the_teacher():
    """The closed-form refit of each cut layer (no training) never raises a part's error
    against the teacher's channels, lowers it on the whole, and brings the student's output
    closer to the teacher's on examples it was not fitted on; only cut layers change."""
    model = frontend.load("resnet18", tiny=True)
    plan = plan_branches(model.mod, 2, "none")
    teacher, student = TorchProgram(model.mod), TorchProgram(BranchRewrite(plan)(model.mod))
    before = {k: v.detach().clone() for k, v in student.weights.items()}
    x = np.random.default_rng(4).standard_normal((96, 3, 32, 32)).astype("float32")
    probe = torch.from_numpy(x[64:])

    def distance() -> float:
        with torch.no_grad():
            t, s = teacher(probe)[0], student(probe)[0]
        return float((s - t).pow(2).sum() / t.pow(2).sum())

    far = distance()
    refits = reconstruct(teacher, student, plan, x[:64])
    assert len(refits) >= 2 * 8, refits  # (both parts of each cut convolution)
    assert all(r.error_after <= r.error_before for r in refits)
    assert np.mean([r.error_after for r in refits]) < 0.5 * np.mean(
        [r.error_before for r in refits])
    assert distance() < 0.5 * far, (distance(), far)
    parts = {r.part for r in refits}
    steps = {s[0]: s for s in student.steps}
    refitted = {steps[p][2][1][1] for p in parts}
    changed = {k for k, v in student.weights.items() if not torch.equal(v, before[k])}
    assert changed and changed <= refitted, changed - refitted
    # distill with the plan refits first (and with epochs=0 does nothing else)
    # (a random teacher's top-1 hardly depends on its input: the logits are compared)
    student = TorchProgram(BranchRewrite(plan)(model.mod))
    report = distill(teacher, student, x, epochs=0, plan=plan, log=lambda _m: None)
    assert report.reconstructed is not None and report.after == report.reconstructed
    assert distance() < 0.5 * far, (distance(), far)
    # training that only does harm is not kept: the held-out split picks the start
    student = TorchProgram(BranchRewrite(plan)(model.mod))
    report = distill(teacher, student, x, epochs=2, lr=50.0, plan=plan, log=lambda _m: None)
    assert report.kept_epoch == 0 and report.after == report.reconstructed, report
    assert distance() < 0.5 * far, (distance(), far)


def test_sync_points_go_where_cuts_hurt_most_within_the_bytes():
    """The measured policy: each cut layer's loss is what its refitted parts leave against
    the teacher; the sync points kept are those losing most per byte, within the limit."""
    model = frontend.load("resnet18", tiny=True)
    ana = analyse(model.mod, 2)
    cands = {c.layer: c.gather_bytes for c in sync_candidates(ana)}
    x = np.random.default_rng(5).standard_normal((64, 3, 32, 32)).astype("float32")
    loss = cut_losses(TorchProgram(model.mod), model.mod,
                      plan_branches(model.mod, 2, "none", analysis=ana), x)
    assert loss and set(loss) <= set(cands) and all(v >= 0 for v in loss.values())
    assert keep_where_cuts_hurt(ana, loss, 0) == frozenset()
    assert keep_where_cuts_hurt(ana, loss, sum(cands.values())) == frozenset(cands)
    limit = sum(cands.values()) // 3
    kept = keep_where_cuts_hurt(ana, loss, limit)
    assert kept and sum(cands[c] for c in kept) <= limit
    # a layer whose cut loses far more than the rest is the first kept
    worst = max(cands, key=cands.get)
    assert keep_where_cuts_hurt(ana, {**loss, worst: 1e9}, cands[worst]) == {worst}


def test_hints_match_the_parts_of_cut_layers_to_the_teachers_channels():
    """Each cut layer's output is emitted per branch; its hint names that part and the
    teacher's channels it holds, and distilling with hints brings the parts closer to them."""
    model = frontend.load("resnet18", tiny=True)
    ana = analyse(model.mod, 2)
    plan = plan_branches(model.mod, 2, "none", analysis=ana)
    teacher, student = TorchProgram(model.mod), TorchProgram(BranchRewrite(plan)(model.mod))
    parts = hints(plan, ana, {s[0] for s in student.steps})
    assert parts and {h.original for h in parts} <= set(plan.branched)
    x = np.random.default_rng(2).standard_normal((160, 3, 32, 32)).astype("float32")
    probe = torch.from_numpy(x[:32])

    def distance() -> float:
        with torch.no_grad():
            t, s = teacher.run(probe), student.run(probe)
        return sum(float((s[h.part] - t[h.original].index_select(
            h.axis, torch.from_numpy(h.channels))).pow(2).mean()) for h in parts)

    assert len(hints(plan, ana, {s[0] for s in student.steps}, cut_only=False)) > len(parts)
    far = distance()
    distill(teacher, student, x, epochs=3, hints=parts, log=lambda _m: None)
    assert distance() < 0.8 * far, (distance(), far)


@I.ir_module
class SoftmaxHead:
    @R.function
    def main(x: R.Tensor((1, 8), "float32"), w: R.Tensor((8, 4), "float32"),
             b: R.Tensor((1, 4), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            m = R.matmul(x, w)
            z = R.add(m, b)
            p = R.nn.softmax(z, axis=-1)
            gv = R.reshape(p, R.shape([1, 4]))
            R.output(gv)
        return gv


def test_distillation_of_a_softmax_output_uses_its_logits():
    """Shipped classifiers often end in a softmax: the soft targets are then taken from its
    input (softening probabilities again would make them nearly uniform), and the student is
    trained on its own logits."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4)).astype("float32")
    b = rng.standard_normal((1, 4)).astype("float32")
    teacher = TorchProgram(bind(SoftmaxHead, w=w, b=b))
    student = TorchProgram(bind(SoftmaxHead, w=(w + rng.standard_normal(w.shape))
                                .astype("float32"), b=b))
    assert logits_var(teacher) == "z" and logits_var(student) == "z"
    assert logits_var(TorchProgram(frontend.load("resnet18", tiny=True).mod)) is None
    x = rng.standard_normal((600, 8)).astype("float32")
    probe = torch.from_numpy(x[:100])

    def distance() -> float:  # between logits centred per example (softmax ignores a shift)
        with torch.no_grad():
            d = student.run(probe)["z"] - teacher.run(probe)["z"]
            return float((d - d.mean(-1, keepdim=True)).abs().mean())

    far = distance()
    report = distill(teacher, student, x, epochs=30, lr=2e-2,
                     log=lambda _m: None)
    assert distance() < 0.1 * far, (distance(), far)  # (on probabilities: ~0.2)
    assert report.after >= 0.9, report


def test_cli_compile_finetune_run(tmp_path):
    """The user's path: compile --strategy branch, finetune on .npz data, run --check (which
    compares the distributed run with the distilled branch model)."""
    import subprocess
    import sys

    def splitc(*args):
        return subprocess.run([sys.executable, "-m", "splitc.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=600)

    out = tmp_path / "out"
    bad = splitc("compile", "resnet18", "--tiny", "--strategy", "branch", "--devices", "host",
                 "-o", out)
    assert bad.returncode == 2 and "at least 2 devices" in bad.stderr
    bad = splitc("compile", "resnet18", "--tiny", "--strategy", "branch", "--sync", "lots",
                 "-o", out)
    assert bad.returncode == 2 and "--sync 'lots'" in bad.stderr
    done = splitc("compile", "resnet18", "--tiny", "--strategy", "branch", "--devices",
                  "host,host", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "branch: 2 branches; 19 of 19 candidate layers cut" in done.stderr
    assert (out / "branch.json").exists()
    x = np.random.default_rng(0).standard_normal((200, 3, 32, 32)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x)
    np.savez(tmp_path / "wrong.npz", x=x[:, :, :16])
    bad = splitc("finetune", out, "--data", tmp_path / "wrong.npz")
    assert bad.returncode == 2 and "the model takes [3, 32, 32]" in bad.stderr
    tuned = splitc("finetune", out, "--data", tmp_path / "data.npz", "--epochs", "6",
                   "--max-accuracy-drop", "100")
    assert tuned.returncode == 0, tuned.stderr
    assert "top-1 agreement with the teacher: original 1.0000, branch model before" \
        in tuned.stdout
    assert (out / "student.npz").exists()
    check = splitc("run", out, "--check")
    assert check.returncode == 0, check.stderr
    assert "the split gives the branch model's answer" in check.stdout


@pytest.mark.slow  # (distillation: the CLI test below distils in the default run)
def test_policy_search_takes_the_fewest_bytes_within_the_limit():
    from splitc.planning.speeds import cluster_speeds
    from splitc.planning.strategies.branch import search_policy

    model = frontend.load("resnet18", tiny=True)
    x = np.random.default_rng(2).standard_normal((200, 3, 32, 32)).astype("float32")
    # any loss allowed: the first policy tried, no sync point at all
    cluster = Cluster.uniform(["host", "host"])
    plan, student, trials = search_policy(model.mod, 2, x, None, max_drop=100.0, epochs=1,
                                          cluster=cluster, speeds=cluster_speeds(cluster),
                                          log=lambda _m: None)
    assert [t.label for t in trials] == ["no sync"] and student is not None
    assert trials[0].latency > 0  # priced by the cost model
    assert trials[0].sync == [] and len(plan.branched) == 19
    # no loss allowed (below any measurement): every policy is tried, bytes growing, and the
    # search ends at the exact plan with nothing to train
    plan, student, trials = search_policy(model.mod, 2, x, None, max_drop=-1.0, epochs=1,
                                          log=lambda _m: None)
    assert trials[-1].label == "every sync kept" and student is None
    assert plan.branched == frozenset() and len(trials) >= 3
    assert [t.gather_bytes for t in trials] == sorted(t.gather_bytes for t in trials)


@pytest.mark.parametrize("dense", [False, True])
def test_the_bounded_swap_search_picks_the_full_matrix_swap(dense, monkeypatch):
    # sparse affinities between atoms (weights only) take the bounded path; dense ones (co-firing)
    # can defeat the bound and fall back; either way the swap is the full matrix's argmax
    from splitc.passes.split import branch as B

    sizes = []
    rate = B._swap_gains
    monkeypatch.setattr(B, "_swap_gains",
                        lambda dd, p, sub: sizes.append(len(p)) or rate(dd, p, sub))
    rng = np.random.default_rng(3)
    for trial in range(20):
        n, k = 600, 4
        dd = rng.random((n, k)) * rng.random()
        p = rng.integers(0, k, n)
        if dense:
            sub = rng.random((n, n)) * 0.5
        else:
            sub = np.zeros((n, n))
            i, j = rng.integers(0, n, 40), rng.integers(0, n, 40)
            sub[i, j] = rng.random(40)
        sub = sub + sub.T
        if trial % 5 == 0:  # ties: repeated rows
            dd[1::2] = dd[::2][: len(dd[1::2])]
        full = rate(dd, p, sub)
        ia, ib = np.unravel_index(np.argmax(full), full.shape)
        assert B._best_swap(dd, p, sub, k, top=8) == (ia, ib, full[ia, ib])
    # the sparse case never needed the n x n matrix
    assert dense or max(sizes) < 600
