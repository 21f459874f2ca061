"""NeMo (Hintersdorf et al., NeurIPS 2024): memorization score, activation statistics and neuron localization.

Pure tensor math plus the UNet calls that the score needs; no file or network I/O.
"""
