"""Cold-cache throughput of libtorch's CPU decode kernels on LLaVA-7B layer shapes (M = 1):
the int4 g128 kernel and the bf16 dense linear, cycling through several layers' weights so they
come from memory, not cache. Compares with `experiments bench` to tell kernel time from the rest.
Run: .venv/bin/python python/profile_decode_kernels.py
"""
import torch, time
torch.set_num_threads(2)
torch.manual_seed(0)
def mk(n,k,g=128):
    codes = torch.randint(0,16,(n,k),dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    sz = torch.rand(k//g, n, 2, dtype=torch.bfloat16)
    return packed, sz
shapes=[(4096,4096)]*4+[(11008,4096),(11008,4096),(4096,11008)]
layers=[[mk(n,k) for (n,k) in shapes] for _ in range(4)]
x4096=torch.randn(1,4096,dtype=torch.bfloat16); x11008=torch.randn(1,11008,dtype=torch.bfloat16)
bytes_layer=sum(n*k//2 + (k//128)*n*4 for n,k in shapes)
for rep in range(3):
    t=time.perf_counter()
    for L in layers:
        for (n,k),(p,sz) in zip(shapes,L):
            torch._weight_int4pack_mm_for_cpu(x4096 if k==4096 else x11008, p, 128, sz)
    dt=(time.perf_counter()-t)/len(layers)
    print(f"int4 kernels only: {dt*1e3:.2f} ms/layer, {bytes_layer/dt/1e9:.1f} GB/s, x32 layers = {dt*32*1e3:.0f} ms")
# bf16 dense for comparison
wl=[[torch.randn(n,k,dtype=torch.bfloat16) for (n,k) in shapes] for _ in range(2)]
for rep in range(2):
    t=time.perf_counter()
    for L in wl:
        for (n,k),w in zip(shapes,L):
            torch.nn.functional.linear(x4096 if k==4096 else x11008, w)
    dt=(time.perf_counter()-t)/len(wl)
    print(f"bf16 linears only: {dt*1e3:.2f} ms/layer, {sum(n*k*2 for n,k in shapes)/dt/1e9:.1f} GB/s, x32 = {dt*32*1e3:.0f} ms")
