"""The model's input contract, defined once.

Every engine takes uint8 pixels shaped N×C×64×64 and returns float32 probabilities of a positive finding; the cast
and the normalisation live inside the graph, so the host never converts pixels to float. The lake stores pixels as
raw H×W×C bytes, which for one channel is the same memory as C×H×W.
"""

from __future__ import annotations

IMAGE_SIZE = 64
"""Height and width of every image in the lake and at every engine's input."""

SUPPORTED_CHANNELS = (1, 3)
"""1: grayscale (X-ray thumbnails); 3: RGB (pathology patches). A lake holds one or the other."""


PIXEL_MEAN = 127.5
PIXEL_STD = 64.0
"""Normalisation applied inside every graph: (pixel - PIXEL_MEAN) / PIXEL_STD, the same for every channel."""

TARGET_SENSITIVITY = 0.98
"""What a shipped model promises by default: sensitivity at least this (optimize's gate, audit's and calibrate's
target unless a manifest or the user says otherwise)."""

INPUT_NAME = "pixels"
OUTPUT_NAME = "score"
"""Names of the exported graph's input (uint8 N×C×64×64) and output (float32 N, the probability of a positive)."""
