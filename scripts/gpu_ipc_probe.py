"""Landing bandwidth into a GPU KV pool: in this process vs a spawned process over CUDA IPC, with the
GPU idle vs busy with matmuls, with one 2D copy per chunk vs one torch copy per plane (Llama-3-8B
KV shapes). `python3 scripts/gpu_ipc_probe.py` on a CUDA machine; see docs/results-gpu.md."""

import multiprocessing as mp
import os
import threading
import time

import torch

L, H, D, BS, CH = 32, 8, 128, 16, 256
BPC = CH // BS
N = 32


def make(pool):
    from shadowserve.dataplane.buffers import SlotPool
    from shadowserve.dataplane.kv_targets import CudaEngineKV

    t = CudaEngineKV(pool, CH)
    nbytes = L * 2 * CH * H * D * 2
    slots = SlotPool("kv", 2, nbytes, pinned=True)
    views = [slots.tensor(i)[:nbytes].view(torch.bfloat16).view(L, 2, CH, H, D) for i in range(2)]
    for v in views:
        v.copy_(torch.randn(v.shape).to(torch.bfloat16))
    plans = [t.plan(tuple(range(i * BPC, (i + 1) * BPC))) for i in range(N)]
    return t, slots, views, plans


def scatter_all(t, views, plans):
    t0 = time.perf_counter()
    for i, p in enumerate(plans):
        t.scatter(p, views[i % 2])
    return time.perf_counter() - t0


def child(pool, q_in, q_out):
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[-max(1, len(cores) // 4) :])  # the data plane's quarter
    torch.set_num_threads(1)
    t, slots, views, plans = make(pool)
    q_out.put(("ready", t.copy_2d is not None))
    while True:
        cmd = q_in.get()
        if cmd is None:
            return
        if cmd == "plane":
            t.copy_2d = None
            continue
        q_out.put(scatter_all(t, views, plans))


def busy_gpu(stop):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def measure(label, fn, gb):
    """Best of three passes with the GPU idle, then best of three while another thread keeps it busy."""
    fn()
    idle = min(fn() for _ in range(3))
    stop = threading.Event()
    load = threading.Thread(target=busy_gpu, args=(stop,))
    load.start()
    time.sleep(0.5)
    loaded = min(fn() for _ in range(3))
    stop.set()
    load.join()
    print(
        f"{label:<14} idle {gb / idle:6.1f} GB/s   GPU busy with matmuls {gb / loaded:6.1f} GB/s", flush=True
    )


def main():
    pool = torch.zeros(L, 2, N * BPC, BS, H, D, dtype=torch.bfloat16, device="cuda")
    gb = N * L * 2 * CH * H * D * 2 / 1e9
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    child_proc = ctx.Process(target=child, args=(pool, q_in, q_out), daemon=True)
    child_proc.start()
    print("child ready, 2D copies:", q_out.get(timeout=120)[1])
    target, _slots, views, plans = make(pool)

    def remote():
        q_in.put("go")
        return q_out.get(timeout=120)

    measure("in-process", lambda: scatter_all(target, views, plans), gb)
    measure("child over IPC", remote, gb)
    q_in.put("plane")
    target.copy_2d = None
    measure("in-proc/plane", lambda: scatter_all(target, views, plans), gb)
    measure("child/plane", remote, gb)
    q_in.put(None)
    child_proc.join(10)


if __name__ == "__main__":
    main()
