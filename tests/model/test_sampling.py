"""Samplers, CFG and determinism: a seed gives the same pixels alone and inside any batch."""
import pytest
import torch

from app.model import PatchPool, denoise_step, generate, new_job
from app.model.dmp import new_patch_for
from app.model.sampling import eager_step, guide, make_scheduler, step_table, vector_step

from .test_dmp import randomize_patch


def run_jobs(model, jobs, pool=None):
    while any(not j.done for j in jobs):
        denoise_step(model, [j for j in jobs if not j.done], step=eager_step(model, pool) if pool else None)
    return [j.latents for j in jobs]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_seed_is_independent_of_batch_mates(tiny_class, sampler):
    p1 = randomize_patch(new_patch_for(tiny_class), seed=1, std=0.3).eval()
    pool = PatchPool(32, 16, 3, slots=3)
    slot = pool.install(p1)
    kw = dict(sampler=sampler, guidance_scale=2.0)
    alone = run_jobs(tiny_class, [new_job(tiny_class, y=3, seed=7, steps=4, slot=slot, **kw)], pool)[0]
    mates = [new_job(tiny_class, y=1, seed=8, steps=6, n=2, **kw),  # other seed, label, step count, base
             new_job(tiny_class, y=3, seed=7, steps=4, slot=slot, **kw),
             new_job(tiny_class, y=9, seed=9, steps=3, slot=slot, sampler="ddim", guidance_scale=1.0)]
    together = run_jobs(tiny_class, mates, pool)[1]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    other_seed = run_jobs(tiny_class, [new_job(tiny_class, y=3, seed=8, steps=4, slot=slot, **kw)], pool)[0]
    assert (other_seed - alone).abs().max() > 1e-3


def test_generate_is_deterministic_and_uint8(tiny_class):
    a = generate(tiny_class, y=[1, 2], seeds=[5, 6], steps=3, sampler="ddim", guidance_scale=1.5)
    b = generate(tiny_class, y=2, seeds=[6], steps=3, sampler="ddim", guidance_scale=1.5)
    assert a.dtype == torch.uint8 and a.shape == (2, 8, 8, 4)
    assert torch.equal(a[1:], b)


def test_guidance_changes_output_and_one_means_no_cfg(tiny_class):
    j1 = new_job(tiny_class, y=3, seed=1, steps=2, guidance_scale=1.0)
    assert j1.y_null is None and j1.rows == 1
    g = [run_jobs(tiny_class, [new_job(tiny_class, y=3, seed=1, steps=2, sampler="ddim", guidance_scale=s)])[0]
         for s in (1.0, 4.0)]
    assert (g[0] - g[1]).abs().max() > 1e-3


def test_guide_all_channels_vs_first3():
    cond, uncond = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    channels = torch.arange(4)[None] < torch.tensor([[4], [3]])  # row 0: all channels, row 1: the first 3
    out = guide(cond, uncond, torch.tensor([2.0, 2.0]), channels)
    assert (out[0] == 2).all()
    assert (out[1, :3] == 2).all() and (out[1, 3:] == 1).all()


def test_unconditional_and_text_generation(tiny_uncond, tiny_text):
    img = generate(tiny_uncond, seeds=[0, 1], steps=2, sampler="ddpm")
    assert img.shape == (2, 8, 8, 4)

    class FixedEncoder:
        dim = 16

        def encode(self, captions):
            g = torch.Generator().manual_seed(len(captions[0]))
            return torch.randn(len(captions), 16, generator=g)

    a = generate(tiny_text, captions="a seven", text_encoder=FixedEncoder(), seeds=[3], steps=2, guidance_scale=3.0)
    b = generate(tiny_text, captions="a thick one", text_encoder=FixedEncoder(), seeds=[3], steps=2,
                 guidance_scale=3.0)
    assert a.shape == (1, 8, 8, 4) and not torch.equal(a, b)


def test_class_label_out_of_range(tiny_class):
    with pytest.raises(ValueError, match="class labels"):
        generate(tiny_class, y=10, seeds=[0], steps=1)


def test_ddpm_learned_range_uses_variance_channels(tiny_class):
    sched = make_scheduler("ddpm", 250, learn_sigma=True, clip_sample=False)
    assert sched.config.variance_type == "learned_range" and len(sched.timesteps) == 250


def test_ddim_never_clips_x0():
    """diffusers' DDIM clips x0 but keeps the raw epsilon, which wrecks pixel-space samples."""
    sched = make_scheduler("ddim", 50, learn_sigma=True, clip_sample=True)
    assert sched.config.clip_sample is False
    assert make_scheduler("ddpm", 50, learn_sigma=True, clip_sample=True).config.clip_sample is True


@pytest.mark.parametrize("sampler,learn_sigma,clip", [("ddim", True, False), ("ddpm", True, False),
                                                      ("ddpm", True, True), ("ddpm", False, False)])
def test_vector_step_equals_diffusers_step(sampler, learn_sigma, clip):
    sched = make_scheduler(sampler, 25, learn_sigma=learn_sigma, clip_sample=clip)
    table = step_table(sched)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        x, eps, v = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
        v = v.clamp(-1, 1) if learn_sigma and sampler == "ddpm" else None
        out = torch.cat([eps, v], 1) if v is not None else eps
        kw = {"generator": torch.Generator().manual_seed(i)} if sampler == "ddpm" else {}
        expect = sched.step(out, t, x, **kw).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) if table[7, i] > 0 else None
        got = vector_step(x, eps, table[:, i, None].expand(-1, 3), v, noise)
        torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)


def test_dpm_solver_keeps_its_own_scheduler_step_and_other_configs_are_refused():
    assert step_table(make_scheduler("dpm", 10, learn_sigma=True, clip_sample=False)) is None
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="no batched update"):
        step_table(DDPMScheduler(variance_type="fixed_large"))
    with pytest.raises(ValueError, match="unsupported"):
        step_table(DDPMScheduler(prediction_type="v_prediction"))


def test_ddim_and_ddpm_jobs_share_one_scheduler_per_setting_and_stay_independent(tiny_class, monkeypatch):
    """A server builds no diffusers scheduler per request (~1 ms of Python the runner waits for in eager mode);
    jobs only read the shared one, so stepping one job leaves another of the same setting untouched."""
    import app.model.sampling as sampling

    made = []
    real = sampling.make_scheduler
    monkeypatch.setattr(sampling, "make_scheduler", lambda *a, **k: made.append(a) or real(*a, **k))
    sampling.shared_schedule.cache_clear()
    kw = dict(sampler="ddim", steps=5, guidance_scale=2.0)
    a, b = new_job(tiny_class, y=3, seed=1, **kw), new_job(tiny_class, y=3, seed=1, **kw)
    assert len(made) == 1 and a.scheduler is b.scheduler
    new_job(tiny_class, y=3, seed=1, sampler="dpm", steps=5)  # multistep state: a scheduler of its own
    c, d = (new_job(tiny_class, y=3, seed=1, sampler="dpm", steps=5) for _ in range(2))
    assert c.scheduler is not d.scheduler
    before = b.latents.clone()
    run_jobs(tiny_class, [a])
    assert a.done and b.index == 0 and not b.done and torch.equal(b.latents, before)
    assert run_jobs(tiny_class, [b])[0].equal(a.latents)
