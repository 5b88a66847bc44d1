"""Qwen-Image-2.1 (and its Turbo checkpoint): `facts` (torch-free), `pipeline` (the stages and the denoise loop),
`dit` (our reference forward over `QwenImage21Transformer2DModel`)."""
