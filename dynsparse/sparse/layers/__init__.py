"""Modules that hold only a weight's active entries (CSR): the linear layer and its weight
(``csr_linear``), their autograd functions and the helpers on the batch-innermost layout
(``csr_functions``), the sparse convolution and the WideResNet twin (``csr_conv``), and the
ResNet twins (``csr_resnet``: the package's ResNet-50, torchvision's ResNet family). The engine's
storages (:mod:`dynsparse.sparse.storage`) drive them."""
