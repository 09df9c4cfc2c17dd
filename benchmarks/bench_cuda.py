"""GPU benchmark: the CBE of many ResNet-18 clients held on one CUDA device.

Compares, on the same GPU and the same client models (float32 state_dicts, one tensor per
parameter, as a server holds them):

* mars_native's CUDA backend: ``concentrated_backdoor_energy_batch_cuda`` (one batch of launches
  for all clients: fp64 Gram + Householder/Laguerre per channel, then top-k per layer), timed end to end from
  Python (CUDA events around the call), and the same kernels with the launch descriptors built
  beforehand (``kernels only``: what a server that keeps its client buffers pays). Each is also
  timed as GPU time alone (a spin kernel queued first hides the host's launch work from the
  events), and the kernels-only GPU time is split into spectral norms and top-k;
* the memory-read floor: the bytes the CBE must read (every scored conv weight and its BN
  vectors), divided by the device's read bandwidth measured with ``torch.sum`` over one buffer
  of that size;
* PyTorch: ``torch.linalg.matrix_norm(W.reshape(out, in, -1), ord=2)`` batched over the channels
  of each layer of each client (plus the BN scale and ``torch.topk``), and the same with every
  layer stacked over the clients first (one ``matrix_norm`` call per layer; the stack's copy is
  included).

Prints a Markdown table (median of ``--repeat`` runs after warm-up; the PyTorch baselines:
median of ``--torch-repeat`` runs after a warm-up on one client) with the GPU model, the
command, and the ratios the issue asks for (mars vs floor: target <= 2x; torch vs mars: target
>= 5x). Without a CUDA device (or without the CUDA backend, or without torch CUDA) it prints why
and exits 0; nothing is estimated.

Usage: python benchmarks/bench_cuda.py [--clients 100] [--repeat 10] [--kappa 0.05] [--json out]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time


def resnet18_shapes(width: int = 64, classes: int = 10) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of a CIFAR-style ResNet-18 state_dict (3x3 stem, BasicBlocks, 11.2M
    parameters), in module order."""
    shapes: list[tuple[str, tuple[int, ...]]] = []

    def conv_bn(conv: str, bn: str, cout: int, cin: int, k: int) -> None:
        shapes.append((f"{conv}.weight", (cout, cin, k, k)))
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes.append((f"{bn}.{leaf}", (cout,)))
        shapes.append((f"{bn}.num_batches_tracked", ()))

    conv_bn("conv1", "bn1", width, 3, 3)
    cin = width
    for i, (cout, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)], 1):
        for b in range(2):
            p = f"layer{i}.{b}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", cout, cin if b == 0 else cout, 3)
            conv_bn(f"{p}.conv2", f"{p}.bn2", cout, cout, 3)
            if b == 0 and (stride != 1 or cin != cout):
                conv_bn(f"{p}.shortcut.0", f"{p}.shortcut.1", cout, cin, 1)
        cin = cout
    shapes += [("linear.weight", (classes, cin)), ("linear.bias", (classes,))]
    return shapes


def make_states(torch, n: int, device, seed: int = 0) -> list[dict]:
    """n client state_dicts on `device`: a random global model plus per-client noise, with
    non-trivial BatchNorm statistics."""
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = resnet18_shapes()
    base = {}
    for key, shape in shapes:
        if key.endswith("num_batches_tracked"):
            base[key] = torch.zeros(shape, dtype=torch.int64, device=device)
        elif key.endswith(".weight") and len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            base[key] = torch.randn(shape, generator=g, device=device) / math.sqrt(fan_in)
        elif key.endswith("running_var"):
            base[key] = 1.0 + 0.2 * torch.rand(shape, generator=g, device=device)
        elif key.endswith(".weight"):
            base[key] = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:
            base[key] = 0.1 * torch.randn(shape, generator=g, device=device)
    states = []
    for _ in range(n):
        states.append({k: (v + 0.01 * v.std() * torch.randn(v.shape, generator=g, device=device)
                           if v.is_floating_point() and v.ndim >= 1 else v.clone())
                       for k, v in base.items()})
    return states


def cuda_time(torch, fn, repeat: int, warmup: int = 2, warm_fn=None) -> tuple[float, object]:
    """Median milliseconds of fn() measured with CUDA events (host work included: the GPU waits
    for the launches); returns (ms, last result). warm_fn (default fn) runs ``warmup`` times
    first."""
    result = None
    for _ in range(warmup):
        result = (warm_fn or fn)()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), result


def gpu_time(torch, fn, repeat: int, warmup: int = 2) -> tuple[float, float, bool]:
    """(median GPU ms, median host ms, covered) of fn(): the GPU time of its kernels alone. A spin
    kernel (torch.cuda._sleep) queued before the start event keeps the GPU busy while the host
    builds and enqueues fn's launches, so the events see only the GPU work; the spin lasts 3x
    the longest measured host time + 5 ms at 2 GHz (covered: it outlasted the host work in every
    run, else the GPU time includes idle gaps and is an over-estimate)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    hosts = []
    for _ in range(max(3, repeat // 2)):
        t = time.perf_counter()
        fn()
        hosts.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    host_ms = statistics.median(hosts)
    cycles = int((3.0 * max(hosts) + 5.0) * 2.0e6)  # at up to 2 GHz
    times, covered = [], True
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
        covered &= not start.query()  # the spin is still running when the host is done
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), host_ms, covered


def read_floor_ms(torch, n_bytes: int, device, repeat: int) -> float:
    """Milliseconds to read n_bytes once at the device's rate: torch.sum over one float32 buffer
    of that size (a pure streaming read)."""
    buf = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
    ms, _ = cuda_time(torch, buf.sum, repeat)
    return ms


def torch_cbe(torch, states, layers, kappa: float, eps: float = 1e-5):
    """The CBE with PyTorch ops, per client and layer (matrix_norm batched over channels)."""
    from mars_native._native import top_k_count

    rows = []
    for s in states:
        parts = []
        for layer in layers:
            w = s[layer.weight_key]
            sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
            if layer.bn_prefix is not None:
                var = s[f"{layer.bn_prefix}.running_var"].clamp(min=0)
                sigma = sigma * (s[f"{layer.bn_prefix}.weight"].abs() / torch.sqrt(var + eps))
            parts.append(torch.topk(sigma, top_k_count(int(w.shape[0]), kappa)).values)
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def torch_cbe_stacked(torch, states, layers, kappa: float, eps: float = 1e-5):
    """The CBE with PyTorch ops, every layer stacked over the clients (one matrix_norm per layer)."""
    from mars_native._native import top_k_count

    parts = []
    for layer in layers:
        w = torch.stack([s[layer.weight_key] for s in states])  # (clients, out, in, kh, kw)
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], w.shape[2], -1), ord=2)
        if layer.bn_prefix is not None:
            var = torch.stack([s[f"{layer.bn_prefix}.running_var"] for s in states]).clamp(min=0)
            gamma = torch.stack([s[f"{layer.bn_prefix}.weight"] for s in states]).abs()
            sigma = sigma * (gamma / torch.sqrt(var + eps))
        parts.append(torch.topk(sigma, top_k_count(int(w.shape[1]), kappa), dim=1).values)
    return torch.cat(parts, dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--kappa", type=float, default=0.05)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--skip-torch", action="store_true", help="skip the (slow) PyTorch baselines")
    ap.add_argument("--torch-repeat", type=int, default=3,
                    help="timed runs of each PyTorch baseline after one warm-up run (median)")
    ap.add_argument("--torch-clients", type=int, default=0,
                    help="score only the first N clients with the PyTorch baselines (mars_native "
                         "is then timed on the same N for the ratio); 0 = all")
    ap.add_argument("--stacked-budget-s", type=float, default=40.0,
                    help="run the stacked PyTorch baseline only if the per-layer one took less")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--profile", help="also write a cProfile summary (by cumulative time) of 5 "
                                      "end-to-end CBE calls to this text file")
    args = ap.parse_args(argv)

    from mars_native import _core, _cuda, _cuda_arrays, _cuda_states

    info = _cuda.cuda_info()
    if not info["compiled"]:
        print("no CUDA device: the CUDA backend is not compiled into mars_native (build with nvcc "
              "and MARS_NATIVE_CUDA=ON); nothing measured")
        return 0
    if info["devices"] == 0:
        print(f"no CUDA device: {info['reason']}; nothing measured")
        return 0
    try:
        import torch
    except ImportError:
        print("no CUDA device usable: torch is not installed; nothing measured")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device usable from torch (CPU-only torch build); nothing measured")
        return 0

    dev = torch.device("cuda", args.device)
    torch.cuda.set_device(dev)
    gpu = torch.cuda.get_device_name(dev)
    states = make_states(torch, args.clients, dev)
    layers = _cuda_states.find_layers_from_shapes(states[0], None, False, "paper")
    n_bytes = sum(
        s[layer.weight_key].numel() * s[layer.weight_key].element_size()
        + (2 * s[f"{layer.bn_prefix}.weight"].numel() * 4 if layer.bn_prefix else 0)
        for s in states for layer in layers
    )

    t0 = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)

    progress(f"{args.clients} clients on {gpu}; measuring the read floor")
    sum_ms = read_floor_ms(torch, n_bytes, dev, args.repeat)
    bandwidth = n_bytes / (sum_ms / 1e3)

    results: dict = {"gpu": gpu, "clients": args.clients, "bytes": n_bytes, "repeat": args.repeat,
                     "torch_repeat": args.torch_repeat, "floor_ms": sum_ms,
                     "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:  # after every measurement: a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    save()
    progress(f"floor {sum_ms:.3f} ms; measuring mars_native end to end")

    def mars_end_to_end():
        return _cuda.concentrated_backdoor_energy_batch_cuda(states, layers, args.kappa)

    mars_ms, cbe = cuda_time(torch, mars_end_to_end, args.repeat)
    mars_gpu_ms, mars_host_ms, mars_covered = gpu_time(torch, mars_end_to_end, args.repeat)
    results.update(mars_ms=mars_ms, mars_gpu_ms=mars_gpu_ms, mars_host_ms=mars_host_ms)
    save()
    if args.profile:  # where the host time of the end-to-end call goes
        import cProfile
        import io
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            mars_end_to_end()
        torch.cuda.synchronize()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        with open(args.profile, "w") as f:
            f.write(text.getvalue())
    progress(f"mars {mars_ms:.3f} ms (GPU {mars_gpu_ms:.3f} ms, host {mars_host_ms:.3f} ms); "
             "measuring the kernels alone")

    # Kernels only: descriptors and outputs prepared once (what is left is the GPU work plus the
    # C++ launch path).
    weights = [s[layer.weight_key] for s in states for layer in layers]
    scales = [_cuda.bn_scale_cuda(s, layer.bn_prefix) for s in states for layer in layers]
    lib = _cuda_arrays.TorchArrays(dev)
    energies = [torch.empty(int(w.shape[0]), dtype=torch.float64, device=dev) for w in weights]
    counts = [int(_core.top_k_count(args.kappa, int(w.shape[0]))) for w in weights[: len(layers)]]
    out = torch.empty((len(states), sum(counts)), dtype=torch.float64, device=dev)
    views = [out[i, o:o + c] for i in range(len(states))
             for o, c in zip([sum(counts[:j]) for j in range(len(counts))], counts)]
    wd = [lib.desc(w) for w in weights]
    sd = [lib.desc(s) for s in scales]
    ed = [lib.desc(e) for e in energies]
    vd = [lib.desc(v) for v in views]
    stream = lib.stream()

    def spectral_only():
        _core.cuda.channel_spectral_norms(wd, sd, ed, dev.index, stream)

    def top_k_only():
        _core.cuda.top_k_ceil(ed, args.kappa, vd, dev.index, stream)

    def kernels_only():
        spectral_only()
        top_k_only()

    kern_ms, _ = cuda_time(torch, kernels_only, args.repeat)
    kern_gpu_ms, kern_host_ms, kern_covered = gpu_time(torch, kernels_only, args.repeat)
    spec_gpu_ms, spec_host_ms, _ = gpu_time(torch, spectral_only, args.repeat)
    topk_gpu_ms, topk_host_ms, _ = gpu_time(torch, top_k_only, args.repeat)
    same = torch.equal(out, cbe)
    results.update(mars_kernels_ms=kern_ms, mars_kernels_gpu_ms=kern_gpu_ms,
                   mars_kernels_host_ms=kern_host_ms, spectral_gpu_ms=spec_gpu_ms,
                   spectral_host_ms=spec_host_ms, top_k_gpu_ms=topk_gpu_ms,
                   top_k_host_ms=topk_host_ms, covered=bool(mars_covered and kern_covered),
                   covered_end_to_end=bool(mars_covered), covered_kernels=bool(kern_covered),
                   kernels_equal_end_to_end=bool(same))
    save()
    progress(f"kernels {kern_ms:.3f} ms (GPU {kern_gpu_ms:.3f}: spectral {spec_gpu_ms:.3f}, top-k "
             f"{topk_gpu_ms:.3f}; host {kern_host_ms:.3f})")

    rows = [("memory-read floor (torch.sum over the same bytes)", sum_ms, None),
            ("mars_native CUDA: CBE batch, end to end from Python", mars_ms, mars_host_ms),
            ("  the same, GPU time of its kernels", mars_gpu_ms, None),
            ("mars_native CUDA: kernels only (descriptors prepared)", kern_ms, kern_host_ms),
            ("  the same, GPU time", kern_gpu_ms, None),
            ("  of which spectral norms (GPU time)", spec_gpu_ms, spec_host_ms),
            ("  of which top-k per layer (GPU time)", topk_gpu_ms, topk_host_ms)]
    torch_ms = stacked_ms = None
    max_rel = None
    n_t = min(args.clients, args.torch_clients or args.clients)
    mars_t_ms = mars_ms  # mars_native end to end on the clients the PyTorch baselines score
    if not args.skip_torch:
        tstates = states[:n_t]
        if n_t < args.clients:  # the same data for both sides of the ratio
            mars_t_ms, _ = cuda_time(
                torch, lambda: _cuda.concentrated_backdoor_energy_batch_cuda(tstates, layers, args.kappa),
                args.repeat)
            rows.append((f"mars_native CUDA: CBE batch of the first {n_t} clients, end to end",
                         mars_t_ms, None, mars_t_ms))
            results.update(torch_clients=n_t, mars_torch_clients_ms=mars_t_ms)
        progress(f"measuring torch per client and layer on {n_t} clients ({args.torch_repeat} runs "
                 "after a warm-up on one client)")
        torch_ms, ref = cuda_time(torch, lambda: torch_cbe(torch, tstates, layers, args.kappa),
                                  args.torch_repeat, warmup=1,
                                  warm_fn=lambda: torch_cbe(torch, states[:1], layers, args.kappa))
        max_rel = float(((ref.double() - cbe[:n_t]).abs() / cbe[:n_t].abs()).max())
        results.update(torch_ms=torch_ms, max_rel_diff_vs_torch=max_rel)
        save()
        rows.append((f"torch.linalg.matrix_norm per client and layer (+BN scale, topk), {n_t} clients",
                     torch_ms, None, mars_t_ms))
        progress(f"torch per layer {torch_ms:.1f} ms")
        if torch_ms < 1000.0 * args.stacked_budget_s:
            stacked_ms, _ = cuda_time(
                torch, lambda: torch_cbe_stacked(torch, tstates, layers, args.kappa), args.torch_repeat,
                warmup=1, warm_fn=lambda: torch_cbe_stacked(torch, states[:2], layers, args.kappa))
            results.update(torch_stacked_ms=stacked_ms)
            save()
            name = f"torch.linalg.matrix_norm per layer, clients stacked (stack included), {n_t} clients"
            rows.append((name, stacked_ms, None, mars_t_ms))
            progress(f"torch stacked {stacked_ms:.1f} ms")
        else:
            progress(f"torch stacked skipped: the per-layer baseline took over {args.stacked_budget_s} s")

    cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    print(f"## CBE of {args.clients} ResNet-18 clients on {gpu}\n")
    print(f"command: `{cmd}`  ")
    print(f"bytes read by the CBE: {n_bytes / 2**30:.3f} GiB ({len(layers)} scored layers per client), "
          f"measured read bandwidth {bandwidth / 1e9:.0f} GB/s; median of {args.repeat} runs "
          f"(PyTorch baselines: median of {args.torch_repeat} after one warm-up)  ")
    print(f"mars_native {_core.build_info()['version']}, CUDA runtime {info['runtime_version']}, "
          f"torch {torch.__version__}  \n")
    print("| method | time (ms) | vs floor (all clients) | vs mars end to end (same clients) | "
          "host time of the call (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, ms, host, *same_clients in rows:  # same_clients: mars_native's time on those clients
        host_s = "" if host is None else f"{host:.3f}"
        vs = ms / (same_clients[0] if same_clients else mars_ms)
        print(f"| {name} | {ms:.3f} | {ms / sum_ms:.2f}x | {vs:.2f}x | {host_s} |")
    print()
    print(f"mars end-to-end / floor = {mars_ms / sum_ms:.2f}x, its GPU time / floor = "
          f"{mars_gpu_ms / sum_ms:.2f}x; kernels only / floor = {kern_ms / sum_ms:.2f}x, their GPU "
          f"time / floor = {kern_gpu_ms / sum_ms:.2f}x (target <= 2x); spin covered the host work: "
          f"{results['covered']}")
    if torch_ms is not None:
        print(f"on {n_t} clients: torch per-layer / mars end to end = {torch_ms / mars_t_ms:.1f}x "
              "(target >= 5x)"
              + (f", torch stacked / mars = {stacked_ms / mars_t_ms:.1f}x" if stacked_ms else "")
              + f"; max relative difference of the CBEs (torch fp32 SVD vs mars fp64 Gram) = "
              f"{max_rel:.2e}")
    print(f"kernels-only result equals the end-to-end result bit for bit: {same}")
    results["command"] = cmd
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
