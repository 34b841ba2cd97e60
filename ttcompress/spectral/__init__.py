"""Singular values of convolutions: exact periodic spectra (FFT + SVD with strides), clipping, estimates."""

from ttcompress.spectral.network import LayerSpectrum, layer_spectrum, network_spectrum
from ttcompress.spectral.periodic import clip, sigma_max, singular_values

__all__ = ["LayerSpectrum", "clip", "layer_spectrum", "network_spectrum", "sigma_max", "singular_values"]
