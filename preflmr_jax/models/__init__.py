"""Flax modules: BERT text encoder, CLIP vision tower, PreFLMR assembly."""
