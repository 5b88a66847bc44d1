"""Profile one full-size Qwen-Image DiT forward: diffusers' own vs ours (random weights, bf16, 1024x1024)."""


import torch
from torch.profiler import ProfilerActivity, profile

from bench.sp_gpu import build_transformer
from imagegen.common.attention import LOCAL_ATTENTION, AttentionLayout
from imagegen.common.families.qwen_image.dit import QwenDiT, qwen_rotary

torch.set_grad_enabled(False)
device = torch.device("cuda")
tr = build_transformer("qwen-image", device, smoke=False)
x = torch.randn(1, 4096, 64, device=device, dtype=torch.bfloat16)
text = torch.randn(1, 128, 3584, device=device, dtype=torch.bfloat16)
t = torch.full((1,), 0.5, device=device, dtype=torch.bfloat16)


def report(name, call):
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    print(f"== {name}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


report("diffusers", lambda: tr(x, text, None, t, [[(1, 64, 64)]], return_dict=False))
dit = QwenDiT(tr)
image_rotary, text_rotary = qwen_rotary(tr, [(1, 64, 64)], 128)
layout = AttentionLayout(LOCAL_ATTENTION, image_rotary.to(device), text_rotary.to(device))
report("ours", lambda: dit(x, text, t, layout))
