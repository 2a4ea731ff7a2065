"""Inversion as a library: DDIM and ReNoise inversion over any backbone (SD1.x/2.x, SDXL, SD3), batched, with
optional CFG, noise regularisation and noise correction; plus the matching sampler to reconstruct.

>>> from diffalign.inversion import invert, sample, RENOISE_SD
>>> result = invert(backbone, x0, cond, 50, renoise=RENOISE_SD)  # ReNoise's official SD settings
>>> x0_again = sample(backbone, result.latents, cond, result.schedule)
"""

from .image import invert_image
from .regularization import autocorrelation, patch_kl, regularize_noise
from .renoise import (
    RENOISE_SD,
    RENOISE_SDXL,
    SMPO_RENOISE,
    InversionResult,
    ReNoiseConfig,
    invert,
    make_predictor,
    paper_renoise,
    prediction_inverse_step,
    renoise_step,
    sample,
)
from .schedule import Schedule, sampling_schedule
from .steps import ddim_inverse_step, ddim_stochastic_std, denoise_step, inverse_step

__all__ = [
    "RENOISE_SD",
    "RENOISE_SDXL",
    "SMPO_RENOISE",
    "InversionResult",
    "ReNoiseConfig",
    "Schedule",
    "autocorrelation",
    "ddim_inverse_step",
    "ddim_stochastic_std",
    "denoise_step",
    "invert",
    "invert_image",
    "inverse_step",
    "make_predictor",
    "paper_renoise",
    "patch_kl",
    "prediction_inverse_step",
    "regularize_noise",
    "renoise_step",
    "sample",
    "sampling_schedule",
]
