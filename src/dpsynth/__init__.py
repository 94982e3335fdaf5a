"""dpsynth: differentially private synthetic image data with diffusion models.

Follows Ghalebikesabi et al. (2023), "Differentially Private Diffusion Models
Generate Useful Synthetic Images". See docs/ and ../shared/DESIGN.md.
"""

__version__ = "0.1.0"
