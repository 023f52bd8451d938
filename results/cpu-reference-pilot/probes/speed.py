import torch, time
torch.manual_seed(0)
x=torch.randn(1024,640); w=torch.randn(2048,640); g=torch.randn(1024,2048)
for _ in range(3): (x@w.T)
t=time.perf_counter()
for _ in range(50):
    y=x@w.T; gx=g@w; gw=g.T@x
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), f"{(time.perf_counter()-t)/50*1000:.1f} ms")
