"""Training objective of DiT: epsilon MSE plus, for learned-sigma models, the variational bound (improved DDPM)."""
from __future__ import annotations

import math

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler  # the defining module: see app/model/sampling.py

from app.model.sampling import noise_schedule_kwargs


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of [-1, 1] data discretised to 256 bins (the t = 0 decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


class Diffusion:
    """Forward process q(x_t | x_0) on DiT's schedule and the per-sample training loss."""

    def __init__(self, beta_schedule: str = "linear", device="cpu"):
        sched = DDPMScheduler(**noise_schedule_kwargs(beta_schedule))
        self.beta_schedule = beta_schedule
        self.num_timesteps = sched.config.num_train_timesteps
        betas = sched.betas.double()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        tables = {
            "sqrt_ac": alphas_cumprod.sqrt(), "sqrt_1m_ac": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_ac": (1.0 / alphas_cumprod).sqrt(), "sqrt_recipm1_ac": (1.0 / alphas_cumprod - 1).sqrt(),
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "post_c0": betas * prev.sqrt() / (1.0 - alphas_cumprod),
            "post_ct": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            "log_betas": torch.log(betas),
        }
        self.t = {k: v.float().to(device) for k, v in tables.items()}

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.t[name][t][:, None, None, None]  # (B, 1, 1, 1)

    def q_sample(self, x0, t, noise):
        return self._at("sqrt_ac", t) * x0 + self._at("sqrt_1m_ac", t) * noise

    def loss(self, model, x0, y, patch=None, generator=None, t=None, noise=None, drop=None) -> torch.Tensor:
        """Mean training loss over the batch for uniformly drawn timesteps (DiT's `training_losses`); t, noise
        and the condition dropout `drop` are drawn here unless given (the trainer draws them per global batch)."""
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        return self.losses(model, x0, y, t, noise, patch=patch, drop=drop).mean()

    def losses(self, model, x0, y, t, noise, patch=None, drop=None) -> torch.Tensor:
        """Per-sample training loss (B,) at given timesteps and noise."""
        x_t = self.q_sample(x0, t, noise)
        return self.output_losses(model(x_t, t, y, patch=patch, drop=drop), x0, x_t, t, noise)

    def output_losses(self, out, x0, x_t, t, noise) -> torch.Tensor:
        """Per-sample training loss (B,) of a model output (B, C_out, H, W) on x_t = q_sample(x0, t, noise)."""
        out = out.float()
        C = x0.shape[1]
        eps = out[:, :C]
        mse = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        if out.shape[1] == C:
            return mse
        return mse + self.vb_term(out[:, C:], eps.detach(), x0, x_t, t)

    def vb_term(self, v, eps, x0, x_t, t) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim; the mean's gradient is stopped as in DiT."""
        min_log, max_log = self._at("post_logvar", t), self._at("log_betas", t)
        frac = (v + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at("sqrt_recip_ac", t) * x_t - self._at("sqrt_recipm1_ac", t) * eps  # unclipped, as DiT
        model_mean = self._at("post_c0", t) * pred_x0 + self._at("post_ct", t) * x_t
        true_mean = self._at("post_c0", t) * x0 + self._at("post_ct", t) * x_t
        kl = normal_kl(true_mean, self._at("post_logvar", t), model_mean, model_logvar).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3))
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        return vb * self.num_timesteps / 1000.0  # DiT's rescale (=1 for 1000 steps)
