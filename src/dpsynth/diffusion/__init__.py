"""Diffusion core: the class-conditional UNet, the noise schedule, the
per-example denoising loss, timestep distributions, EMA and the samplers."""
