"""Kernels and their plumbing: ``reference`` (the math), ``dispatch`` (which backend runs), ``registration``
(fake kernels and autograd for the C++ ops), ``extension`` (loading ``fastdistill._C``)."""
