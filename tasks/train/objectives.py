"""Training objectives of a DiT: DDPM (epsilon, optional learned sigma with the VLB term) and flow matching.

Both draw timesteps and noise, build x_t from clean x_0 (pixels or VAE latents) and return the
per-sample loss. The noise schedule is diffusers' ``DDPMScheduler``; its ``add_noise`` makes x_t.
"""
from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from .config import DiTModelConfig


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] on 256 bins under N(mean, e^(2 log_scale)) (Ho et al. 2020, Eq. 13)."""
    def cdf(v: torch.Tensor) -> torch.Tensor:          # the tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPMObjective:
    """Epsilon prediction on diffusers' DDPM schedule; with learned sigma, DiT's MSE + VLB (in bits per dim)."""

    def __init__(self, num_train_timesteps: int, beta_schedule: str, learn_sigma: bool) -> None:
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       variance_type="learned_range" if learn_sigma else "fixed_small",
                                       clip_sample=False)
        self.learn_sigma = learn_sigma
        betas = self.scheduler.betas.double()
        abar = self.scheduler.alphas_cumprod.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_var = betas * (1 - abar_prev) / (1 - abar)
        # q(x_{t-1} | x_t, x_0): the variance at t = 0 is 0, so its log is clipped to the t = 1 value (as ADM).
        self.posterior_log_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]])).float()
        self.log_betas = torch.log(betas).float()
        self.coef_x0 = (betas * abar_prev.sqrt() / (1 - abar)).float()
        self.coef_xt = ((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)).float()
        self.sqrt_abar, self.sqrt_one_minus_abar = abar.sqrt().float(), (1 - abar).sqrt().float()

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample loss (B,) at random timesteps and noise (from ``generator`` if given)."""
        b, c = x0.shape[:2]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator,
                          device=generator.device if generator else None).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else None)
        noise = noise.to(x0.device, x0.dtype)
        xt = self.scheduler.add_noise(x0, noise, t)
        out = model(xt, t, labels).float()
        eps = out[:, :c]
        loss = _mean_flat((noise.float() - eps) ** 2)
        if self.learn_sigma:
            loss = loss + self._vlb(eps.detach(), out[:, c:], x0.float(), xt.float(), t)
        return loss

    def _vlb(self, eps: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        """The variational bound term L_t for the learned variance (Nichol & Dhariwal 2021, Eq. 15), bits/dim."""
        at = lambda table: table.to(t.device)[t].view(-1, *([1] * (x0.dim() - 1)))  # noqa: E731
        pred_x0 = (xt - at(self.sqrt_one_minus_abar) * eps) / at(self.sqrt_abar)
        model_mean = at(self.coef_x0) * pred_x0 + at(self.coef_xt) * xt
        frac = (v + 1) / 2
        model_log_var = frac * at(self.log_betas) + (1 - frac) * at(self.posterior_log_var)
        true_mean = at(self.coef_x0) * x0 + at(self.coef_xt) * xt
        kl = _mean_flat(normal_kl(true_mean, at(self.posterior_log_var), model_mean, model_log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


class FlowMatchingObjective:
    """Rectified flow: x_t = (1 - s) x_0 + s eps, target eps - x_0, the model sees timestep s * T."""

    def __init__(self, num_train_timesteps: int, timesteps: str) -> None:
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
        self.num_train_timesteps, self.timesteps = num_train_timesteps, timesteps

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        b, c = x0.shape[:2]
        device = generator.device if generator else None
        if self.timesteps == "logit_normal":
            s = torch.sigmoid(torch.randn(b, generator=generator, device=device))
        else:
            s = torch.rand(b, generator=generator, device=device)
        s = s.to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=device).to(x0.device, x0.dtype)
        xt = (1 - s.view(-1, *([1] * (x0.dim() - 1)))) * x0 + s.view(-1, *([1] * (x0.dim() - 1))) * noise
        out = model(xt.to(x0.dtype), s * self.num_train_timesteps, labels).float()
        return _mean_flat((out[:, :c] - (noise - x0).float()) ** 2)


def make_objective(cfg: DiTModelConfig, learn_sigma: bool) -> DDPMObjective | FlowMatchingObjective:
    if cfg.objective == "flow":
        return FlowMatchingObjective(cfg.num_train_timesteps, cfg.flow_timesteps)
    return DDPMObjective(cfg.num_train_timesteps, cfg.beta_schedule, learn_sigma)
