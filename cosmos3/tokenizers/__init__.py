"""Tokenizers: text, vision (Wan VAE), sound (AVAE) and action."""
