"""The compiled sparse Conv2d kernels against PyTorch's dense convolution and its gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from dynsparse.errors import DynsparseError
from dynsparse.sparse.kernels.conv import csc_of, from_cbhw, sparse_conv2d, to_cbhw


def _csr(w: torch.Tensor):
    """CSR (crow, col int32) and values of a dense ``[out, in, kh, kw]`` weight's nonzeros."""
    wf = w.reshape(w.shape[0], -1)
    nz = (wf != 0).nonzero()
    crow = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
    crow[1:] = torch.cumsum((wf != 0).sum(1), 0)
    return crow, nz[:, 1].to(torch.int32), wf[nz[:, 0], nz[:, 1]].clone(), nz


CASES = [  # c_in, c_out, k, stride, pad, h, w, batch, density
    (3, 5, 3, 1, 1, 7, 6, 4, 0.5),
    (3, 5, 3, 2, 1, 7, 8, 3, 0.5),
    (4, 6, 3, 2, 1, 8, 8, 5, 0.7),
    (4, 6, 3, 1, 0, 6, 7, 2, 0.6),
    (4, 6, 1, 1, 0, 5, 5, 3, 0.6),
    (4, 6, 1, 2, 0, 7, 6, 3, 0.6),
    (2, 3, 3, 1, 1, 4, 4, 1, 1.0),
    (5, 4, 3, 2, 1, 9, 9, 17, 0.3),
]


@pytest.mark.parametrize("c_in,c_out,k,stride,pad,h,w,b,density", CASES)
def test_matches_dense_conv_and_its_gradients(c_in, c_out, k, stride, pad, h, w, b, density):
    g = torch.Generator().manual_seed(c_in * 100 + k * 10 + stride)
    weight = torch.randn(c_out, c_in, k, k, generator=g) * (torch.rand(c_out, c_in, k, k, generator=g) < density)
    weight[0] = 0  # an output channel with no entries at all
    crow, col, values, nz = _csr(weight)
    values.requires_grad_()
    x = torch.randn(b, c_in, h, w, generator=g, requires_grad=True)
    xc = to_cbhw(x.detach()).requires_grad_()

    y = sparse_conv2d(xc, values, crow, col, weight.shape, stride, pad)
    wd = weight.clone().requires_grad_()
    y_ref = F.conv2d(x, wd, stride=stride, padding=pad)
    assert y.shape == (c_out, *y_ref.shape[2:], b)
    torch.testing.assert_close(from_cbhw(y), y_ref, atol=1e-5, rtol=1e-5)

    dy = torch.randn(y_ref.shape, generator=g)
    y_ref.backward(dy)
    y.backward(to_cbhw(dy))
    torch.testing.assert_close(from_cbhw(xc.grad), x.grad, atol=1e-5, rtol=1e-5)
    # the weight gradient exists only at the active entries, and equals the dense one there
    dense_grad = wd.grad.reshape(c_out, -1)[nz[:, 0], nz[:, 1]]
    assert values.grad.shape == values.shape
    torch.testing.assert_close(values.grad, dense_grad, atol=1e-4, rtol=1e-5)


def test_transposed_index_reused_and_no_entries():
    weight = torch.zeros(3, 2, 3, 3)
    weight[1, 1, 2, 0] = 2.0
    crow, col, values, _ = _csr(weight)
    tr = csc_of(crow, col, 2, 9)
    assert tr[0].tolist() == [0, 0, 1]  # input channel 0 feeds nothing, channel 1 one entry
    x = torch.randn(2, 5, 5, 3)
    y = sparse_conv2d(x, values, crow, col, weight.shape, 1, 1, transposed=tr)
    ref = F.conv2d(from_cbhw(x), weight, padding=1)
    torch.testing.assert_close(from_cbhw(y), ref)
    assert from_cbhw(y)[:, 0].abs().sum() == 0


@pytest.mark.parametrize("bad", ["stride", "shape", "dtype", "small", "values"])
def test_bad_input_is_one_line_error(bad):
    weight = torch.ones(2, 2, 3, 3)
    crow, col, values, _ = _csr(weight)
    x = torch.randn(2, 5, 5, 3)
    stride, pad = 1, 1
    if bad == "stride":
        stride = 3
    elif bad == "shape":
        x = torch.randn(3, 5, 5, 3)
    elif bad == "dtype":
        x = x.double()
    elif bad == "small":
        x, pad = torch.randn(2, 2, 2, 3), 0
    else:
        values = values.double()
    with pytest.raises(DynsparseError, match="sparse conv"):
        sparse_conv2d(x, values, crow, col, weight.shape, stride, pad)


def test_without_numba_a_one_line_error(monkeypatch):
    import sys

    import dynsparse.sparse.kernels.conv as ck
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba now raises ImportError
    monkeypatch.setattr(ck, "_compiled", None)
    assert not ck.available()
    with pytest.raises(DynsparseError, match=r"pip install 'dynsparse\[kernels\]'"):
        ck.kernels()


def test_kernels_keep_the_thread_count_set(tmp_path):
    # numba's thread pool starts once per process, at the first kernel: a fresh process. Starting it
    # set the OpenMP runtime's count (PyTorch's too) to NUMBA_NUM_THREADS (2 here, whatever the cores)
    import os
    import subprocess
    import sys
    script = (
        "import torch\n"
        "from dynsparse.sparse.kernels.conv import set_threads, sparse_conv2d\n"
        "set_threads(1)\n"  # before numba is loaded, as the CLI does
        "x = torch.randn(2, 4, 4, 3, requires_grad=True)\n"
        "v = torch.randn(2 * 2 * 9, requires_grad=True)\n"
        "crow = torch.tensor([0, 18, 36], dtype=torch.int32)\n"
        "col = torch.arange(18, dtype=torch.int32).repeat(2)\n"
        "sparse_conv2d(x, v, crow, col, (2, 2, 3, 3), 1, 1).sum().backward()\n"
        "import numba\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
        "set_threads(2)\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n")
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "2", "2"]
