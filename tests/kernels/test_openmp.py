"""The CPU library's OpenMP workers: a thread can hand its pool back (the server relies on it)."""

import os
import threading

import torch

from adaroute.kernels import cpu


def process_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_thread_releases_the_openmp_workers_its_kernels_started():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w = torch.randn(1, 256), torch.randn(512, 256)
        out = {}

        def work():  # a fresh thread: its first parallel region starts its own pool of workers
            torch.set_num_threads(2)
            cpu.linear(x, w)
            out["with_pool"] = process_threads()
            out["released"] = cpu.release_openmp_workers()
            out["after"] = process_threads()
            out["again"] = cpu.linear(x, w)  # a later region starts a new pool and computes the same

        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert out["released"] is True
        assert out["after"] < out["with_pool"]
        torch.testing.assert_close(out["again"], x @ w.t(), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(saved)
