"""Sequence-parallel (Ulysses) and CFG-parallel denoising over a torch.distributed group."""
