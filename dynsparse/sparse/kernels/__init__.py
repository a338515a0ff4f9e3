"""Compiled CPU kernels (numba, the optional ``kernels`` extra): the sparse convolution on the
batch-innermost layout (``conv``), batch norm and ReLU on that layout (``cbhw``), and the CSR
linear layer's weight-gradient SDDMM and products (``csr_linear``). Imported only when used."""
