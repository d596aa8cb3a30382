"""On-policy distillation (objective opd, Flow-OPD): the per-step KL to the routed teachers' transitions against a
plain loop and the closed form, zero when the student is its teacher, its gradient toward the teacher's mean,
routing by the prompts each teacher teaches, the student's KL falling in training, resume, export, the pre-flight and
the memory estimate."""

import contextlib

import pytest
import torch

from mixgrpo.checkpoint import latest_checkpoint, load_checkpoint
from mixgrpo.config import ConfigError, build_config, save_config
from mixgrpo.grpo import kl_to_reference
from mixgrpo.models.analytic import GaussianFlow
from mixgrpo.objectives import OnPolicyDistillation, Policy, Samples, Teacher, route
from mixgrpo.plan import build_plan
from mixgrpo.preflight import PreflightError, check_run
from mixgrpo.rollout import rollout
from mixgrpo.rundir import read_metrics
from mixgrpo.sampling import sde_mean_std
from mixgrpo.train import train
from mixgrpo.train.update import UpdateLoop

from gaussian_run import gaussian_run, merged

SIZE = 4  # the Gaussian model of tests/gaussian_run.py


def _teacher(directory, mu: float):
    """An exported Gaussian model (model.safetensors) whose data mean is `mu` everywhere."""
    GaussianFlow(size=SIZE, init_mean=mu).save_pretrained(directory)
    return str(directory)


def _prompts(path, prompts):
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def test_route_sends_each_prompt_to_the_teachers_that_teach_it():
    a = Teacher(lambda x, s, c: x, frozenset({"a red cube", "two spheres"}), 1.0)
    b = Teacher(lambda x, s, c: x, frozenset({"a green cone"}), 0.5)
    every = Teacher(lambda x, s, c: x, None, 0.25)  # prompts "" : an anchor on every prompt
    w = route(["a red cube", "a green cone", "two spheres", "a green cone"], [a, b, every])
    assert w.tolist() == [[1.0, 0.0, 0.25], [0.0, 0.5, 0.25], [1.0, 0.0, 0.25], [0.0, 0.5, 0.25]]


def test_the_kl_is_the_closed_form_of_two_gaussians_of_one_std():
    g = torch.Generator().manual_seed(0)
    mean, mean_t = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    std = torch.rand(5, 1, 1, 1, generator=g) + 0.1
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                               torch.distributions.Normal(mean_t, std.expand_as(mean)))
    torch.testing.assert_close(kl_to_reference(mean, mean_t, std), closed.flatten(1).mean(1))  # per element, as log-probs


def _samples_and_objective(teacher_mus: list[float], teacher_prompts: list[set[str] | None], student_mu: float = 0.0):
    """An OPD objective over a real rollout of the Gaussian model (2 prompts x 2 images, MixGRPO's window of 2 SDE
    steps, CFG-free) with teachers of data means `teacher_mus`, each teaching `teacher_prompts`."""
    torch.manual_seed(0)
    student = GaussianFlow(size=SIZE, init_mean=student_mu)
    teachers = [Teacher(GaussianFlow(size=SIZE, init_mean=mu).requires_grad_(False),
                        None if p is None else frozenset(p), 1.0) for mu, p in zip(teacher_mus, teacher_prompts)]
    cfg = build_config(gaussian_run(sampler={"num_steps": 6, "window": {"size": 2}}))
    plan = build_plan(cfg.sampler, 0, 0)
    prompts = ["a red cube", "a green cone"]
    cond = student.encode_prompts(prompts)
    with torch.no_grad():
        traj = rollout(student, plan, cond, 2, [11, 12])
    rows = [p for p in prompts for _ in range(2)]
    samples = Samples(plan, traj, torch.zeros(4), student.encode_prompts(rows), None, [torch.arange(4)], [0] * 4,
                      rows)
    policy = Policy(student, student, contextlib.nullcontext, teachers=teachers)
    return student, samples, OnPolicyDistillation(policy, clip_range=0.2, kl_beta=0.0, guidance_scale=1.0)


def _reference_loss(student, teachers, s: Samples) -> torch.Tensor:
    """The loss by a plain loop: per sample and trained step, sum over the teachers of its prompt of
    w ||mu_student - mu_teacher||^2 / (2 std^2) per latent element; the mean over samples and steps."""
    traj, terms = s.traj, []
    for b in range(len(s.prompts)):
        for k in range(traj.x.shape[1]):
            x, sigma, sigma_next = traj.x[b:b + 1, k], traj.sigma[b:b + 1, k], traj.sigma_next[b:b + 1, k]
            cond = {key: v[b:b + 1] for key, v in s.cond.items()}
            mean, std = sde_mean_std(x, student(x, sigma.float(), cond), sigma, sigma_next, s.plan.sde_form, s.plan.eta)
            term = 0.0
            for t in teachers:
                if t.prompts is None or s.prompts[b] in t.prompts:
                    with torch.no_grad():
                        mean_t = sde_mean_std(x, t.velocity(x, sigma.float(), cond), sigma, sigma_next,
                                              s.plan.sde_form, s.plan.eta)[0]
                    term = term + t.weight * ((mean - mean_t) ** 2 / (2 * std ** 2)).mean()
            terms.append(term)
    return torch.stack([torch.as_tensor(t) for t in terms]).mean()


def _update(student, samples, objective, lr: float = 0.0):
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    loop = UpdateLoop(dict(student.named_parameters()), optimizer, micro_batch_size=3, grad_clip=0.0, ema=None,
                      clock=None)
    return objective.update(loop, samples).means()


def test_the_routed_loss_and_its_gradient_equal_a_plain_loop():
    """Two teachers of different means, each teaching one prompt: the update's loss, per-teacher KLs and gradient
    equal the loop over samples (micro-batches of 3 across the two prompts' rows)."""
    student, s, objective = _samples_and_objective([0.4, -0.3], [{"a red cube"}, {"a green cone"}])
    means = _update(student, s, objective)
    grad = student.mu.grad.clone()
    student.mu.grad = None
    ref = _reference_loss(student, objective.policy.teachers, s)
    ref.backward()
    assert means["kl_to_teachers"] == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, student.mu.grad, rtol=1e-5, atol=1e-8)
    # each teacher's KL over its own samples only (routed wrong, a teacher would see the other prompt's too)
    for i, t in enumerate(objective.policy.teachers):
        assert means[f"kl_to_teacher{i}"] == pytest.approx(_kl_over(student, t, s).item(), rel=1e-5)


def _kl_over(student, teacher, s: Samples) -> torch.Tensor:
    """The KL to `teacher` averaged over every sample and step, 0 for the samples it does not teach."""
    keep = [b for b, p in enumerate(s.prompts) if p in teacher.prompts]
    sub = Samples(s.plan, _take(s.traj, keep), s.advantages[keep], {k: v[keep] for k, v in s.cond.items()}, None,
                  s.shares, s.seeds, [s.prompts[b] for b in keep])
    with torch.no_grad():
        return _reference_loss(student, [Teacher(teacher.velocity, None, 1.0)], sub) * len(keep) / len(s.prompts)


def _take(traj, rows):
    from mixgrpo.rollout import Trajectory

    return Trajectory(traj.x[rows], traj.x_next[rows], traj.sigma[rows], traj.sigma_next[rows], traj.log_prob[rows],
                      traj.step[rows], traj.final[rows], traj.nfe)


def test_the_loss_is_zero_for_the_teacher_itself_and_its_gradient_pulls_toward_the_teachers_mean():
    student, s, objective = _samples_and_objective([0.0], [None])
    means = _update(student, s, objective)
    assert means["kl_to_teachers"] == 0 and student.mu.grad.abs().max() == 0
    student, s, objective = _samples_and_objective([0.5], [None])
    _update(student, s, objective)
    # the mean of the transitions grows with the data mean: descending the KL raises mu toward the teacher's 0.5
    assert (student.mu.grad < 0).all()
    before = (student.mu - 0.5).abs().mean().item()
    _update(student, s, objective, lr=1.0)
    assert (student.mu - 0.5).abs().mean().item() < before


def _cfg(tmp_path, teachers, **over):
    data = gaussian_run(objective="opd", run={"iterations": 6, "out_dir": str(tmp_path / "run"), "checkpoint_every": 2}, optim={"lr": 0.05}, eval={"num_prompts": 2}, distill={"teachers": teachers})
    return build_config(merged(data, over))


def test_the_student_moves_toward_its_teacher_and_is_exported_like_any_run(tmp_path):
    teacher = _teacher(tmp_path / "teacher", 0.3)
    run = train(_cfg(tmp_path, [{"path": teacher}], run={"iterations": 8}), progress=False)
    kls = [m["kl_to_teachers"] for m in read_metrics(run)]
    assert kls[-1] < 0.5 * kls[0]
    mu = load_checkpoint(latest_checkpoint(run))["model"]["mu"]
    assert 0.05 < mu.mean() < 0.35
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(str(run / "final" / "model.safetensors"))["mu"], mu)


def test_a_teacher_run_directory_teaches_through_routing(tmp_path):
    """A teacher given as a run directory (its final/) and another as an export; each taught only its prompts: the
    teacher run at lr 1e-12 (its final/ is the student's base to ~1e-12) sees a KL of ~0 on its prompts."""
    prompts = ["a red cube", "a green cone", "two blue spheres", "a yellow cube"]
    train_file = _prompts(tmp_path / "train.txt", prompts)
    teacher_run = train(build_config(gaussian_run(run={"iterations": 1, "out_dir": str(tmp_path / "trun")}, optim={"lr": 1e-12}, eval={"num_prompts": 0}, rollout={"prompts": train_file})), progress=False)
    cfg = _cfg(tmp_path, [{"path": str(teacher_run), "prompts": _prompts(tmp_path / "a.txt", prompts[:2])},
                          {"path": _teacher(tmp_path / "t1", -0.4), "prompts": _prompts(tmp_path / "b.txt", prompts[2:])}],
               run={"iterations": 1}, rollout={"prompts": train_file}, update={"steps_per_epoch": 1})
    (record,) = read_metrics(train(cfg, progress=False))
    assert record["kl_to_teacher0"] < 1e-12 and record["kl_to_teacher1"] > 1e-4


@pytest.mark.parametrize("reward_weight", [0.0, 1.0])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, reward_weight):
    distill = {"teachers": [{"path": _teacher(tmp_path / "teacher", 0.3)}], "reward_weight": reward_weight}
    full = train(_cfg(tmp_path / "full", [], distill=distill), progress=False)
    cut = _cfg(tmp_path / "cut", [], distill=distill)
    train(cut, progress=False, stop_after=3)
    resumed = train(cut, resume=True, progress=False)
    assert torch.equal(load_checkpoint(latest_checkpoint(full))["model"]["mu"],
                       load_checkpoint(latest_checkpoint(resumed))["model"]["mu"])
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert [drop(m) for m in read_metrics(full)] == [drop(m) for m in read_metrics(resumed)]


def test_a_resume_refuses_a_teacher_that_changed(tmp_path):
    """Nothing of a teacher is checkpointed: the checkpoint records its files, and a resume with other weights at the
    teacher's path stops, naming the field."""
    from mixgrpo.checkpoint import CheckpointError

    teacher = _teacher(tmp_path / "teacher", 0.3)
    cfg = _cfg(tmp_path, [{"path": teacher}], run={"iterations": 2}, eval={"num_prompts": 0})
    train(cfg, progress=False, stop_after=1)
    _teacher(tmp_path / "teacher", -0.3)
    with pytest.raises(CheckpointError, match=r"distill.teachers\[0\].path"):
        train(cfg, resume=True, progress=False)


def test_objective_and_teachers_go_together():
    with pytest.raises(ConfigError, match="distill.teachers"):
        build_config(gaussian_run(objective="opd"))
    with pytest.raises(ConfigError, match="objective 'opd' only"):
        build_config(gaussian_run(distill={"teachers": [{"path": "t"}]}))
    with pytest.raises(ConfigError, match=r"distill.teachers\[0\].weight"):
        build_config(gaussian_run(objective="opd", distill={"teachers": [{"path": "t", "weight": 0}]}))


def test_preflight_names_each_teacher_problem_in_one_line(tmp_path):
    other = tmp_path / "other"  # a run of another model (the Gaussian model at another size)
    (other / "final").mkdir(parents=True)
    save_config(build_config(gaussian_run(model={"name": "gaussian", "args": {"size": 8}})), other / "config.yaml")
    GaussianFlow(size=8).save_pretrained(other / "final")
    empty = tmp_path / "empty"
    empty.mkdir()
    train_file = _prompts(tmp_path / "train.txt", ["a red cube", "a green cone"])
    cfg = _cfg(tmp_path, [{"path": str(tmp_path / "nowhere")}, {"path": str(other)}, {"path": str(empty)},
                          {"path": str(other), "prompts": _prompts(tmp_path / "x.txt", ["a purple torus"])}],
               rollout={"prompts": train_file})
    with pytest.raises(PreflightError) as e:
        check_run(cfg)
    lines = str(e.value).splitlines()
    assert any(line.startswith("distill.teachers[0].path:") and "does not exist" in line for line in lines)
    assert any(line.startswith("distill.teachers[1].path:") and "student's own model" in line for line in lines)
    assert any(line.startswith("distill.teachers[2].path:") and "holds no model" in line for line in lines)
    assert any(line.startswith("distill.teachers[3].prompts:") and "none of the training prompts" in line
               for line in lines)
    # prompts no teacher teaches, without a reward term
    teacher = _teacher(tmp_path / "t", 0.1)
    cfg = _cfg(tmp_path, [{"path": teacher, "prompts": _prompts(tmp_path / "a.txt", ["a red cube"])}],
               rollout={"prompts": train_file})
    with pytest.raises(PreflightError, match="1 of the 2 training prompts .* have no teacher"):
        check_run(cfg)
    check_run(_cfg(tmp_path, [{"path": teacher, "prompts": str(tmp_path / "a.txt")}], rollout={"prompts": train_file},
                   distill={"teachers": [{"path": teacher, "prompts": str(tmp_path / "a.txt")}],
                            "reward_weight": 0.5}))


def test_a_teacher_trained_from_a_copy_of_the_base_elsewhere_is_the_students_model(tmp_path):
    """The teacher's run names its base at another place (a copy, or the base moved): the same files, one model."""
    import shutil

    base = GaussianFlow(size=SIZE, init_mean=0.1)
    base.save_pretrained(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "base_copy")
    run = tmp_path / "teacher_run"
    (run / "final").mkdir(parents=True)
    save_config(build_config(gaussian_run(model={"name": "gaussian", "args": {"size": SIZE,
                                                                               "path": str(tmp_path / "base_copy")}})),
                run / "config.yaml")
    base.save_pretrained(run / "final")
    cfg = _cfg(tmp_path, [{"path": str(run)}], model={"name": "gaussian", "args": {"size": SIZE,
                                                                                    "path": str(tmp_path / "base")}})
    check_run(cfg)
    GaussianFlow(size=SIZE, init_mean=0.2).save_pretrained(tmp_path / "base_copy")  # now other weights
    with pytest.raises(PreflightError, match="a teacher must be the student's own model"):
        check_run(cfg)


def test_the_memory_estimate_counts_the_teachers(tmp_path):
    import tiny_pipelines
    from mixgrpo.memory import estimate

    args = {"path": str(tiny_pipelines.save_tiny_sd3(tmp_path / "pipe")), "dtype": "float32", "height": 32,
            "width": 32, "max_sequence_length": 24}
    alone = estimate(build_config({"model": {"name": "sd3", "args": args}}))
    two = estimate(build_config({"model": {"name": "sd3", "args": args}, "objective": "opd",
                                 "distill": {"teachers": [{"path": "a"}, {"path": "b"}]}}))
    loaded = sum(n for name, n in alone.params.items() if not name.startswith("text_encoder"))  # transformer, VAE
    assert loaded < sum(alone.params.values())
    assert two.parts["2 teachers (frozen, without text encoders)"] == 2 * 4 * loaded  # float32
    assert two.total == alone.total + 2 * 4 * loaded


@pytest.mark.filterwarnings("ignore:prompt .* was truncated")
def test_a_real_model_teacher_exported_outside_a_run_loads_without_text_encoders(tmp_path):
    """SD3 (tiny pipeline) with CFG: a full fine-tune's export (a transformer directory) outside any run is put into
    the student's base without loading its text encoders, and a teacher equal to the base is a KL of exactly 0."""
    import tiny_pipelines
    from mixgrpo.export import export_model
    from mixgrpo.models.base import build_model

    args = {"path": str(tiny_pipelines.save_tiny_sd3(tmp_path / "pipe")), "dtype": "float32", "height": 32,
            "width": 32, "max_sequence_length": 24}
    export_model(build_model("sd3", args), tmp_path / "teacher")
    cfg = build_config({
        "algorithm": "flow_grpo", "sampler": {"num_steps": 3}, "objective": "opd", "model": {"name": "sd3", "args": args},
        "distill": {"teachers": [{"path": str(tmp_path / "teacher")}]}, "rewards": [{"name": "toy_rewards:brightness"}],
        "rollout": {"prompts": _prompts(tmp_path / "p.txt", ["a red cube", "two blue spheres"]), "guidance_scale": 3.0,
                    "prompts_per_iteration": 1, "group_size": 2},
        "update": {"steps_per_epoch": 1}, "eval": {"num_prompts": 0}, "run": {"iterations": 1, "out_dir": str(tmp_path / "run")}})
    (record,) = read_metrics(train(cfg, progress=False))
    assert record["kl_to_teachers"] == 0 and record["grad_norm"] == 0
