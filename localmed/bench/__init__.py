"""``localmed bench``: what quantization cost, measured on medical question sets."""
